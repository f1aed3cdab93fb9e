"""The scale-out path: REDIS_URL set -> webhook events enqueue RQ work -> a real `rq worker` runs the job; a runner
that loses its project's Redis lock stops its job. (A real job trained to a promoted version under RQ:
tests/test_e2e_training.py.)"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import requests
from redis import Redis

from tests.backend_server import start_backend
from tests.services import rq_worker
from trainer.jobs_redis import RedisJobStore, RedisRunner

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_start_training_runs_through_rq_worker(redis_url, tmp_path):
    model_dir = tmp_path / "models"
    env = {"MODEL_DIR": str(model_dir), "REDIS_URL": redis_url, "WORKERS": "1"}
    worker_env = {**os.environ, **env}
    worker_env.pop("LABEL_STUDIO_URL", None)
    worker_env.pop("LABEL_STUDIO_API_KEY", None)
    with rq_worker(redis_url, worker_env, tmp_path / "rq.log", REPO_ROOT):
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


def test_a_runner_that_loses_its_project_lock_kills_its_job(redis_url, tmp_path):
    """Never two writers of a project: once the project's Redis lock is gone (it expired while the host was cut
    off, or another worker took it), the runner kills its job's child at the next renewal and records why."""
    store = RedisJobStore.from_url(redis_url, prefix="lost-lock:")
    job_id, _ = store.enqueue("7", "train", "TEST")
    child_pid = tmp_path / "child.pid"
    body = f"import os, time; open({str(child_pid)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    runner = RedisRunner(store, [sys.executable, "-c", body], wake=lambda job, delay: None, lock_ttl_s=1.5)

    def take_the_lock_away() -> None:
        deadline = time.monotonic() + 30
        while not (child_pid.exists() and child_pid.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        Redis.from_url(redis_url).delete("lost-lock:lock:7")

    threading.Thread(target=take_the_lock_away, daemon=True).start()
    started = time.monotonic()
    assert runner.run(job_id) == "failed"
    assert time.monotonic() - started < 30  # killed at a renewal (every 0.5 s), not after the child's 120 s
    assert "lock expired" in store.job(job_id).error
    pid = int(child_pid.read_text())
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive, "the job's child outlived its project's lock"
