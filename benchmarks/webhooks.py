"""Webhook latency under load (issue 18): Label Studio waits WEBHOOK_TIMEOUT = 1 s for a webhook and never
retries, so an event answered late may be lost.

Run: .venv/bin/python -m benchmarks.webhooks   -> benchmarks/results/webhooks.json

The backend runs as the README starts it (gunicorn, 1 worker), with jobs recorded but not run (TRAINING_RUNNER
off): the training load is a `python -m ml_backend train` at nice 10, as the dispatcher runs a job. For each
configuration, in this one run: webhooks every 0.1 s while idle; the same while 4 clients ask /predict for a new
image each call and the trainer runs; then a burst of 500 events from 8 threads under the same load, every event
counted in the job store. Configurations: today's defaults (16 threads, PREDICT_CONCURRENCY 2) and the old ones
(4 threads, no compute slots). All traffic stays on 127.0.0.1; every loop is bounded in count and time.
"""
from __future__ import annotations

import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from benchmarks.common import machine
from tests import dataset
from tests.backend_server import REPO_ROOT, start_backend
from tests.dataset import make_coco
from tests.image_server import serve_files
from tests.test_scale import CONFIG, TOKEN, box_task, distinct_images

LOAD_S = 45.0
CLIENTS = 4
BURST, BURST_THREADS = 500, 8
OUT = Path(__file__).parent / "results" / "webhooks.json"
ONLY = os.environ.get("WEBHOOK_BENCH_ONLY")  # run one configuration (a name prefix), for experiments
CONFIGS = {"now (16 threads, PREDICT_CONCURRENCY=2)": {"THREADS": "16", "PREDICT_CONCURRENCY": "2"},
           "before (4 threads, no compute slots)": {"THREADS": "4", "PREDICT_CONCURRENCY": "1000"}}


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summary(latencies: list[float]) -> dict:
    return {"n": len(latencies), "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p99_ms": round(1000 * percentile(latencies, 99), 1), "max_ms": round(1000 * max(latencies), 1),
            "over_1s": sum(1 for x in latencies if x > 1.0)}


def events_stored(model_dir: Path) -> int:
    with sqlite3.connect(model_dir / "jobs.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM events").fetchone()[0]


def post_webhook(session: requests.Session, url: str, event: int) -> tuple[float, bool]:
    body = {"action": "ANNOTATION_CREATED", "project": {"id": 900}, "annotation": {"id": event}}
    started = time.perf_counter()
    try:
        ok = session.post(f"{url}/webhook", json=body, timeout=30).json().get("status") == "recorded"
    except (requests.RequestException, ValueError):
        ok = False
    return time.perf_counter() - started, ok


def steady_webhooks(url: str, seconds: float, first_event: int) -> list[float]:
    session, latencies = requests.Session(), []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(latencies) < 2000:
        latency, ok = post_webhook(session, url, first_event + len(latencies))
        assert ok, "a webhook was not recorded"
        latencies.append(latency)
        time.sleep(max(0.0, 0.1 - latency))
    return latencies


def burst(url: str, first_event: int) -> tuple[list[float], int]:
    latencies, failed, lock = [], [0], threading.Lock()

    def sender(index: int) -> None:
        session = requests.Session()
        for i in range(index, BURST, BURST_THREADS):
            latency, ok = post_webhook(session, url, first_event + i)
            with lock:
                latencies.append(latency)
                failed[0] += not ok

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(BURST_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return latencies, failed[0]


class PredictLoad:
    """CLIENTS threads, each posting /predict for one new image (one box) after another, until stopped."""

    def __init__(self, url: str, urls: list[str]) -> None:
        self.url, self.urls, self.stop = url, list(urls), threading.Event()
        self.latencies: list[float] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def _next(self) -> str | None:
        with self.lock:
            return self.urls.pop() if self.urls else None

    def _client(self) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            image = self._next()
            if image is None:
                return
            started = time.perf_counter()
            response = session.post(f"{self.url}/predict", timeout=300, json={
                "tasks": [box_task(1, image)], "label_config": CONFIG, "project": "1.1"})
            response.raise_for_status()
            with self.lock:
                self.latencies.append(time.perf_counter() - started)

    def __enter__(self) -> "PredictLoad":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(300)


def trainer(workdir: Path) -> subprocess.Popen:
    split = dataset.splits()
    coco = make_coco(workdir / "coco", {"train": split["train"][:16], "val": split["val"][:4], "test": []})
    command = [sys.executable, "-m", "ml_backend", "train", "--data", str(coco), "--project", "bench",
               "--model-dir", str(workdir / "train-models"), "--epochs", "200", "--patience", "1000"]
    return subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, "LOG_LEVEL": "WARNING"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lambda: os.nice(10))


def measure(name: str, config: dict, image_host: str, urls: list[str], work: Path) -> dict:
    model_dir = work / "models"
    env = {"LABEL_STUDIO_URL": image_host, "LABEL_STUDIO_API_KEY": TOKEN, "MODEL_DIR": str(model_dir),
           "TRAINING_RUNNER": "off", "LOG_LEVEL": "WARNING", "WORKERS": "1", **config}
    with start_backend(env, work / "backend.log") as url:
        idle = steady_webhooks(url, 15, 0)
        train = trainer(work)
        try:
            time.sleep(8)  # the trainer is past loading, encoding its images
            with PredictLoad(url, urls) as load:
                time.sleep(2)
                loaded = steady_webhooks(url, LOAD_S, 10_000)
                burst_latencies, not_recorded = burst(url, 20_000)
            assert train.poll() is None, "the trainer ended before the load did"
        finally:
            train.kill()
            train.wait(30)
        stored = events_stored(model_dir)
    sent = len(idle) + len(loaded) + BURST
    print(f"{name}: idle {summary(idle)}; loaded {summary(loaded)}; burst {summary(burst_latencies)}", flush=True)
    return {"idle": summary(idle), "under_load": summary(loaded), "burst": summary(burst_latencies),
            "burst_not_recorded": not_recorded, "events_sent": sent, "events_stored": stored,
            "events_lost": sent - stored, "predict_calls": len(load.latencies),
            "predict_p50_s": round(statistics.median(load.latencies), 2) if load.latencies else None}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        paths = distinct_images(tmp / "images", 240)
        files = {f"/data/upload/1/{p.name}": p for p in paths}
        urls = list(files)
        result = {"machine": machine(), "load_s": LOAD_S, "clients": CLIENTS, "burst": BURST,
                  "burst_threads": BURST_THREADS, "trainer_nice": 10, "configs": {}}
        with serve_files(files, TOKEN) as image_host:
            for index, (name, config) in enumerate(CONFIGS.items()):
                if ONLY and not name.startswith(ONLY):
                    continue
                work = tmp / f"run{index}"
                work.mkdir()
                half = urls[index * 120:(index + 1) * 120]  # new images for each configuration
                result["configs"][name] = {"env": config, **measure(name, config, image_host, half, work)}
        result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if not ONLY:
        OUT.parent.mkdir(exist_ok=True)
        OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
