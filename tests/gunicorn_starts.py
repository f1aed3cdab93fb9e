"""One fresh start of the backend as scripts/start.sh runs it (gunicorn + ml_backend/gunicorn_conf.py), on a new
MODEL_DIR, with WORKERS workers; then a stop (SIGTERM) while the pre-warm thread embeds images. What it reports
is what a start-up or stop bug shows: a worker that failed to boot, a backend never healthy, a worker that aborted
on exit, a log line that is not JSON. Used by tests/test_startup.py (a few rounds) and benchmarks/startup.py (20).
"""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests import dataset
from tests.backend_server import GUNICORN, REPO_ROOT
from tests.label_studio import free_port

CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="box" toName="image"><Label value="nucleus"/></RectangleLabels>
<BrushLabels name="mask" toName="image"><Label value="nucleus"/></BrushLabels></View>"""
OTHER_SETTINGS = ("LABEL_STUDIO_", "BASIC_AUTH", "AUTH_", "REDIS_URL", "TRAINING_", "PORT", "BIND")  # not inherited
ABORT_SIGNS = ("terminate called", "SIGABRT", "Aborted", "core dumped", "Worker failed to boot", "Traceback")


@dataclass
class StartReport:
    healthy: bool = False
    seconds_to_healthy: float | None = None
    ready_workers: int = 0          # distinct pids that logged "ready" (model loaded)
    stopped_clean: int = 0          # workers that logged "stopped" with clean: true
    exit_code: int | None = None    # gunicorn master's
    non_json: list[str] = field(default_factory=list)
    abort_lines: list[str] = field(default_factory=list)
    log_path: str = ""

    @property
    def ok(self) -> bool:
        return (self.healthy and self.exit_code == 0 and not self.non_json and not self.abort_lines)


def _prewarm_body(images: int) -> dict:
    """A TASKS_CREATED webhook with `images` dsb2018 images as data: URIs (no image host needed)."""
    tasks = [{"id": 1000 + i, "data": {"image": "data:image/png;base64,"
                                       + base64.b64encode(dataset.image_path(i).read_bytes()).decode()}}
             for i in range(1, images + 1)]
    return {"action": "TASKS_CREATED", "project": {"id": 1, "label_config": CONFIG}, "tasks": tasks}


def fresh_start(root: Path, workers: int = 4, timeout_s: float = 240, env: dict[str, str] | None = None) -> StartReport:
    """Start on root/models (must not exist), wait until every worker has loaded the model (bounded), queue
    images to pre-warm in each worker, stop with SIGTERM and read the log."""
    model_dir, log_path = root / "models", root / "gunicorn.log"
    assert not model_dir.exists()
    port = free_port()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(OTHER_SETTINGS)}
    full_env = {**inherited, "BIND": f"127.0.0.1:{port}", "WORKERS": str(workers), "MODEL_DIR": str(model_dir),
                "LOG_LEVEL": "INFO", **(env or {})}
    report = StartReport(log_path=str(log_path))
    began = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(GUNICORN, cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = began + timeout_s
        while time.monotonic() < deadline and process.poll() is None:
            if not report.healthy:
                try:
                    report.healthy = requests.get(f"{url}/health", timeout=2).status_code == 200
                    report.seconds_to_healthy = round(time.monotonic() - began, 1) if report.healthy else None
                except requests.RequestException:
                    pass
            if report.healthy and len(_ready_pids(log_path)) >= workers:
                break
            time.sleep(0.5)
        if report.healthy and process.poll() is None:
            body = _prewarm_body(6)
            for _ in range(2 * workers):  # new connections: gunicorn spreads them over the workers
                requests.post(f"{url}/webhook", json=body, timeout=30, headers={"Connection": "close"})
            time.sleep(1.0)  # the pre-warm threads are now inside the encoder
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            report.exit_code = process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
            report.exit_code = None
    _read_log(log_path, report)
    return report


def _entries(log_path: Path) -> list[dict]:
    entries = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _ready_pids(log_path: Path) -> set[int]:
    return {e.get("pid") for e in _entries(log_path) if e.get("event") == "ready"}


def _read_log(log_path: Path, report: StartReport) -> None:
    text = log_path.read_text(errors="replace")
    for line in text.splitlines():
        try:
            json.loads(line)
        except ValueError:
            report.non_json.append(line[:300])
        if any(sign in line for sign in ABORT_SIGNS):
            report.abort_lines.append(line[:300])
    entries = _entries(log_path)
    report.ready_workers = len(_ready_pids(log_path))
    report.stopped_clean = len({e.get("pid") for e in entries if e.get("event") == "stopped" and e.get("clean")})
