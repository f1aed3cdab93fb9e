"""Training at scale (issue 20): two projects' jobs on one RQ worker vs two (two "hosts" sharing MODEL_DIR),
wall time until both jobs are recorded, with the load average before and after each run.

Run: .venv/bin/python -m benchmarks.training_concurrency [--epochs N]   -> benchmarks/results/training_concurrency.json

A real redis-server on 127.0.0.1 (no persistence), real `rq worker` processes, real fine-tuning on the 5-image
COCO subset of tests/test_rq_scale.py (its job body, margin -1: every job promotes a version). Each configuration
runs in a fresh MODEL_DIR and Redis database, all sharing one embedding cache that a warm-up run fills first; jobs are queued through the Redis job store and RQ exactly as the
backend's webhook does. Two workers only pay when the machine has idle cores: the JSON records the core count and
load average so a reader can tell whether it was busy.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine
from tests import hooked
from tests.dataset import make_coco
from tests.services import redis_server, wait_for
from tests.test_rq_scale import JOB_CHILD, SUBSET

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "results" / "training_concurrency.json"
PROJECTS = ("801", "802")


def run_config(redis_url: str, root: Path, coco: Path, workers: int, epochs: int, timeout: float) -> dict:
    """Start `workers` RQ workers, queue one START_TRAINING job per project, time both to their end."""
    from redis import Redis

    from ml_backend.settings import Settings
    from ml_backend.training import rq_wake
    from trainer.jobs import TriggerPolicy
    from trainer.jobs_redis import RedisJobStore

    Redis.from_url(redis_url).flushdb()
    model_dir = root / f"models-{workers}-{epochs}"
    model_dir.mkdir()
    (model_dir / "embeddings").symlink_to(root / "embeddings")  # warmed once: no run pays for encoding
    for project in PROJECTS:
        (model_dir / f"epochs-{project}").write_text(str(epochs))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO_")}
    threads = max(1, (os.cpu_count() or 1) // workers)  # each worker its share of the cores, as a host would run them
    env.update(OMP_NUM_THREADS=str(threads), MODEL_DIR=str(model_dir), REDIS_URL=redis_url, LOG_LEVEL="WARNING")
    hooks = {"training_job_command": [sys.executable, "-c", JOB_CHILD, str(REPO), redis_url, str(model_dir), str(coco)]}
    processes = []
    for i in range(workers):
        with open(root / f"rq-{workers}-{i}.log", "wb") as log:
            processes.append(subprocess.Popen(hooked.command(hooks, "rq.cli", "worker", "training", "--url", redis_url,
                                                             "--name", f"bench-{workers}-{i}", "--with-scheduler"),
                                              cwd=REPO, env=env, start_new_session=True, stdout=log,
                                              stderr=subprocess.STDOUT))
    try:
        from rq import Worker

        wait_for(lambda: len(Worker.all(connection=Redis.from_url(redis_url))) == workers, 60, "rq workers up")
        store = RedisJobStore.from_url(redis_url)
        settings = Settings.from_env({"REDIS_URL": redis_url, "MODEL_DIR": str(model_dir)})
        load_before = [round(x, 2) for x in os.getloadavg()]
        started = time.monotonic()
        ids = [store.record_event(p, "START_TRAINING", 0, TriggerPolicy(), explicit=True)[1] for p in PROJECTS]
        for job_id in ids:
            rq_wake(settings, job_id)
        jobs = wait_for(lambda: all(store.job(i).state in ("succeeded", "failed") for i in ids)
                        and [store.job(i) for i in ids], timeout, "both jobs ended", interval=0.2)
        wall = time.monotonic() - started
        return {"workers": workers, "torch_threads_per_job": threads, "wall_s": round(wall, 1), "states": [j.state for j in jobs],
                "job_s": [round(j.finished_at - j.started_at, 1) for j in jobs],
                "overlapped": jobs[0].started_at < jobs[1].finished_at and jobs[1].started_at < jobs[0].finished_at,
                "rq_workers_used": sorted({j.worker.split("@")[0] for j in jobs}), "loadavg_before": load_before,
                "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        coco = make_coco(root / "coco", SUBSET)
        (root / "embeddings").mkdir()
        with redis_server(root) as redis_url:
            run_config(redis_url, root, coco, 1, 1, args.timeout)  # warm-up: fills the shared embedding cache
            runs = [run_config(redis_url, root, coco, workers, args.epochs, args.timeout) for workers in (1, 2)]
    one, two = runs
    busy = info["loadavg"][0] > 0.5 * (info["cores"] or 1)
    result = {"machine": info, "epochs": args.epochs, "images": sum(len(v) for v in SUBSET.values()), "runs": runs,
              "speedup_two_workers": round(one["wall_s"] / two["wall_s"], 2),
              "machine_busy": busy,
              "note": ("the machine was busy before the run (1-min load average above half the cores): two workers "
                       "compete for the same cores, so the speed-up is a lower bound" if busy else
                       "the machine was idle before the run") + "; each job runs with the cores / workers torch threads "
                      "(OMP_NUM_THREADS); wall time includes each job's model load; a warm-up "
                      "run filled the embedding cache both configurations share, so neither pays for encoding"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
