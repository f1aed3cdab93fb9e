"""The scale-out path: REDIS_URL set -> webhook events enqueue RQ work -> a real `rq worker` runs the job."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.backend_server import start_backend

REPO_ROOT = Path(__file__).resolve().parents[1]


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
