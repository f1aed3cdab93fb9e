"""The scale-out path: REDIS_URL set -> webhook events enqueue RQ work -> a real `rq worker` runs the job."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.backend_server import start_backend
from tests.label_studio import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (scripts/test.sh installs it)"
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(tmp_path_factory.mktemp("redis"))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        from redis import Redis

        deadline = time.monotonic() + 20
        while True:
            try:
                Redis.from_url(url).ping()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def test_start_training_runs_through_rq_worker(redis_url, tmp_path):
    model_dir = tmp_path / "models"
    env = {"MODEL_DIR": str(model_dir), "REDIS_URL": redis_url, "WORKERS": "1"}
    worker_env = {**os.environ, **env}
    worker_env.pop("LABEL_STUDIO_URL", None)
    worker_env.pop("LABEL_STUDIO_API_KEY", None)
    worker = subprocess.Popen([sys.executable, "-m", "rq.cli", "worker", "training", "--url", redis_url,
                               "--with-scheduler"], cwd=REPO_ROOT, env=worker_env, start_new_session=True,
                              stdout=open(tmp_path / "rq.log", "wb"), stderr=subprocess.STDOUT)
    try:
        with start_backend(env, tmp_path / "gunicorn.log") as url:
            status = lambda: requests.get(f"{url}/train/status", params={"project": 41}, timeout=5).json()
            assert status()["runner"] == "rq"
            reply = requests.post(f"{url}/webhook", json={"action": "START_TRAINING", "project": {"id": 41}},
                                  timeout=5).json()
            assert reply["job"] is not None
            deadline = time.monotonic() + 120
            while status()["last"] is None:
                assert time.monotonic() < deadline, (tmp_path / "rq.log").read_text()[-3000:]
                time.sleep(0.5)
            last = status()["last"]
            # the job ran in the RQ worker's child process; with no Label Studio configured it fails, clearly
            assert last["id"] == reply["job"] and last["state"] == "failed"
            assert "no Label Studio URL/token" in last["error"]
            assert status()["running"] is None and status()["queued"] is None
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(20)
