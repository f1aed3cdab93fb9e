"""Start a real Label Studio (1.23.2) offline for end-to-end tests, plus a tiny REST client.

Usage outside pytest::

    with start_label_studio(data_dir) as ls:
        pid = ls.create_project("demo", config)

Only 127.0.0.1 is ever contacted. The binary comes from ``$LABEL_STUDIO_BIN``
(default ``<repo>/.ls-venv/bin/label-studio``).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import requests
from label_studio_sdk.converter.brush import decode_rle, mask2rle

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BIN = REPO_ROOT / ".ls-venv" / "bin" / "label-studio"
HOST = "127.0.0.1"
USERNAME = "test@example.com"
PASSWORD = "test-password-123"
TOKEN = "e2e-test-token-0123456789abcdef"
START_TIMEOUT_S = 180.0

# A SAM-style labeling config: boxes as prompts, brush masks as output.
SAM_LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image"><Label value="nucleus"/></RectangleLabels>
  <BrushLabels name="mask" toName="image"><Label value="nucleus"/></BrushLabels>
</View>"""


class LabelStudioError(RuntimeError):
    """Label Studio could not be started or answered unexpectedly."""


def label_studio_bin() -> Path:
    """Path of the ``label-studio`` executable (``$LABEL_STUDIO_BIN`` or the repo's .ls-venv)."""
    return Path(os.environ.get("LABEL_STUDIO_BIN") or DEFAULT_BIN)


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"<no log: {e}>"


def rect_result(
    x: float, y: float, w: float, h: float, W: int, H: int,
    label: str, from_name: str = "box", to_name: str = "image",
) -> dict[str, Any]:
    """A ``rectanglelabels`` region for a pixel box (x, y, w, h) on a W x H image, in percent."""
    return {
        "from_name": from_name,
        "to_name": to_name,
        "type": "rectanglelabels",
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {
            "x": 100.0 * x / W,
            "y": 100.0 * y / H,
            "width": 100.0 * w / W,
            "height": 100.0 * h / H,
            "rotation": 0,
            "rectanglelabels": [label],
        },
    }


def brush_result(mask: np.ndarray, label: str, region_id: str, from_name: str = "mask",
                 to_name: str = "image") -> dict[str, Any]:
    """A ``brushlabels`` region (RLE of the 0/255 mask, as Label Studio stores it) for an H x W bool mask."""
    height, width = mask.shape
    return {"id": region_id, "from_name": from_name, "to_name": to_name, "type": "brushlabels",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": [label]}}


def gt_brush_results(image_id: int, label: str = "nucleus") -> list[dict[str, Any]]:
    """An annotation's result for a shared-dataset image: one brush region per ground-truth mask."""
    from tests import dataset

    return [brush_result(dataset.gt_mask(a), label, f"m{a['id']}") for a in dataset.annotations(image_id)]


def brush_mask(region: dict[str, Any]) -> np.ndarray:
    """A brushlabels region's RLE as an H x W bool mask (the alpha channel of the decoded RGBA)."""
    height, width = region["original_height"], region["original_width"]
    return decode_rle(region["value"]["rle"]).reshape(height, width, 4)[:, :, 3] == 255


class LabelStudioServer:
    """A running Label Studio reachable at ``url`` with the legacy API token ``token``."""

    def __init__(self, url: str, token: str, log_path: Path | None = None,
                 start_seconds: float | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.log_path = log_path
        self.start_seconds = start_seconds
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {token}"
        self.session.trust_env = False  # never route 127.0.0.1 through a proxy

    # -- plumbing ---------------------------------------------------------
    def request(self, method: str, path: str, *, timeout: float = 120, **kw: Any) -> Any:
        """Call the API; raise ``LabelStudioError`` (with the body) on a non-2xx answer."""
        r = self.session.request(method, self.url + path, timeout=timeout, **kw)
        if not r.ok:
            raise LabelStudioError(f"{method} {path} -> {r.status_code}: {r.text[:2000]}")
        if not r.content:
            return None
        try:
            return r.json()
        except ValueError:
            return r.text

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.request("POST", path, **kw)

    # -- helpers ----------------------------------------------------------
    def create_project(self, title: str, label_config: str, **extra: Any) -> int:
        """Create a project; return its id."""
        body = {"title": title, "label_config": label_config, **extra}
        return int(self.post("/api/projects", json=body)["id"])

    def upload_images(self, project_id: int, paths: Iterable[str | Path]) -> list[int]:
        """Upload image files (multipart, like the UI); return task ids in the order of ``paths``.

        One request per file: a multi-file import does not keep the files' order in its task ids.
        """
        ids: list[int] = []
        for p in map(Path, paths):
            with open(p, "rb") as f:
                out = self.post(f"/api/projects/{project_id}/import", files={p.name: (p.name, f)},
                                params={"commit_to_project": "true", "return_task_ids": "true"})
            if len(out.get("task_ids") or []) != 1:
                raise LabelStudioError(f"import of {p} gave no single task id: {out}")
            ids.append(int(out["task_ids"][0]))
        return ids

    def upload_many(self, project_id: int, paths: Iterable[str | Path], per_request: int = 50) -> list[int]:
        """Upload image files, `per_request` to an import (Django refuses more than 100 files in one request);
        returns the new task ids, sorted (their order is not the files' order)."""
        paths = [Path(p) for p in paths]
        ids: list[int] = []
        for start in range(0, len(paths), per_request):
            handles = [open(p, "rb") for p in paths[start:start + per_request]]
            try:
                out = self.post(f"/api/projects/{project_id}/import",
                                files=[(Path(h.name).name, (Path(h.name).name, h)) for h in handles],
                                params={"commit_to_project": "true", "return_task_ids": "true"}, timeout=600)
            finally:
                for handle in handles:
                    handle.close()
            ids.extend(int(i) for i in out["task_ids"])
        return sorted(ids)

    def import_predictions(self, project_id: int, predictions: list[dict[str, Any]]) -> Any:
        """Predictions ({task, result, model_version, score}) in one request, as a detector pipeline posts them."""
        return self.post(f"/api/projects/{project_id}/import/predictions", json=predictions, timeout=600)

    def create_annotation(self, task_id: int, result: list[dict[str, Any]], **extra: Any) -> int:
        """Create an annotation on a task; return its id."""
        body = {"result": result, **extra}
        return int(self.post(f"/api/tasks/{task_id}/annotations", json=body)["id"])

    def connect_ml_backend(self, project_id: int, url: str, is_interactive: bool = True,
                           title: str = "SAM backend", **extra: Any) -> int:
        """Connect an ML backend at ``url`` to a project; return the ML connection id."""
        body = {"url": url, "project": project_id, "title": title,
                "is_interactive": is_interactive, **extra}
        return int(self.post("/api/ml", json=body)["id"])

    def retrieve_predictions(self, project_id: int) -> Any:
        """Data Manager "Retrieve predictions" on all tasks (LS answers 200 even if the backend fails)."""
        return self.post("/api/dm/actions",
                         params={"id": "retrieve_tasks_predictions", "project": project_id},
                         json={"selectedItems": {"all": True, "excluded": []}})

    def predictions(self, task_id: int) -> list[dict[str, Any]]:
        """Stored predictions of a task."""
        return self.get("/api/predictions", params={"task": task_id})

    def interactive(self, ml_id: int, task_id: int,
                    context_result: list[dict[str, Any]]) -> dict[str, Any]:
        """What the editor gets when the user draws with auto-annotation on."""
        body = {"task": task_id, "context": {"result": context_result}}
        return self.post(f"/api/ml/{ml_id}/interactive-annotating", json=body)

    def tasks(self, project_id: int) -> list[dict[str, Any]]:
        """All tasks of a project (with annotations), by id."""
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            r = self.session.get(self.url + "/api/tasks", timeout=120, params={
                "project": project_id, "page": page, "page_size": 100, "fields": "all"})
            if r.status_code == 404:  # past the last page
                break
            if not r.ok:
                raise LabelStudioError(f"GET /api/tasks -> {r.status_code}: {r.text[:2000]}")
            body = r.json()
            batch = body["tasks"] if isinstance(body, dict) else body
            out.extend(batch)
            total = body.get("total", len(out)) if isinstance(body, dict) else len(out)
            if not batch or len(out) >= total:
                break
            page += 1
        return sorted(out, key=lambda t: t["id"])

    def start_training(self, ml_id: int) -> Any:
        """The "Start Training" button: LS sends START_TRAINING to the backend's /webhook."""
        return self.post(f"/api/ml/{ml_id}/train", json={})

    def export(self, project_id: int, all_tasks: bool = False) -> list[dict[str, Any]]:
        """JSON export; LS includes only tasks with annotations unless ``all_tasks``."""
        params = {"exportType": "JSON", "download_all_tasks": str(all_tasks).lower()}
        return self.get(f"/api/projects/{project_id}/export", params=params)


def _ls_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.upper().endswith("_PROXY") and k not in ("DJANGO_SETTINGS_MODULE",)}
    env.update({
        "LABEL_STUDIO_USERNAME": USERNAME,
        "LABEL_STUDIO_PASSWORD": PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    })
    return env


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Terminate the process group, then kill it if it lingers."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def start_label_studio(data_dir: str | Path, timeout: float = START_TIMEOUT_S,
                       binary: str | Path | None = None,
                       port: int | None = None,
                       env: dict[str, str] | None = None) -> Iterator[LabelStudioServer]:
    """Run ``label-studio start`` on a free 127.0.0.1 port until the block exits; ``env`` adds Label Studio
    settings (e.g. ``ML_TIMEOUT_PREDICT``).

    Raises ``LabelStudioError`` (with the log tail) if the binary is missing, the process dies,
    the server lands on another port, or /health is not 200 within ``timeout`` seconds.
    """
    binary = Path(binary) if binary else label_studio_bin()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise LabelStudioError(
            f"Label Studio binary not found at {binary}. Install it with "
            "`python -m venv .ls-venv && .ls-venv/bin/pip install label-studio==1.23.2` "
            "or point $LABEL_STUDIO_BIN at it.")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "label-studio.log"
    port = port or free_port()
    url = f"http://{HOST}:{port}"
    cmd = [str(binary), "start", "--no-browser", "--internal-host", HOST,
           "--port", str(port), "--data-dir", str(data_dir)]
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**_ls_env(data_dir), **(env or {})}, cwd=data_dir, start_new_session=True)
    try:
        _wait_healthy(proc, url, port, log_path, timeout)
        server = LabelStudioServer(url, TOKEN, log_path, time.monotonic() - t0)
        try:  # proves it is our server and that the legacy token is accepted
            server.get("/api/current-user/whoami", timeout=30)
        except (LabelStudioError, requests.RequestException) as e:
            raise LabelStudioError(f"token check failed: {e}\n--- log tail ---\n"
                                   f"{_tail(log_path)}") from e
        yield server
    finally:
        _stop(proc)


_STARTED_RE = re.compile(rb"Starting development server at http://[^:/\s]+:(\d+)/")


def _wait_healthy(proc: subprocess.Popen, url: str, port: int, log_path: Path,
                  timeout: float) -> None:
    """Poll /health until 200; fail fast if LS dies or announces a different port."""
    def fail(why: str) -> LabelStudioError:
        return LabelStudioError(f"{why}\n--- tail of {log_path} ---\n{_tail(log_path)}")

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise fail(f"label-studio exited with code {proc.returncode} before becoming healthy")
        m = _STARTED_RE.search(log_path.read_bytes())
        if m and int(m.group(1)) != port:  # LS silently moves to port+1 when its port is taken
            raise fail(f"label-studio started on port {int(m.group(1))} instead of {port}")
        try:
            r = requests.get(url + "/health", timeout=2, proxies={"http": "", "https": ""})
            if r.status_code == 200 and m:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise fail(f"label-studio not healthy at {url}/health within {timeout:.0f}s")
