"""Training at scale on Redis + RQ (REDIS_URL): Redis holds job records, coalescing and the projects' locks; two
`rq worker` processes sharing one MODEL_DIR stand for two hosts. A real redis-server on 127.0.0.1, real
fine-tuning on a 5-image COCO subset (a job body that needs no Label Studio: the workers start through
tests/hooked.py, which sets ml_backend.training.job_command)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from tests import hooked
from tests.backend_server import start_backend
from tests.dataset import make_coco
from tests.test_jobs import check_min_annotations_and_debounce
from tests.faults import registry_problems
from tests.services import log_tail, wait_for
from trainer.jobs import TriggerPolicy
from trainer.jobs_redis import ProjectLock, RedisJobStore, lock_held

REPO = Path(__file__).resolve().parents[1]
SUBSET = {"train": [4, 12, 25], "val": [93], "test": [62]}
POLICY = TriggerPolicy(min_annotations=3, debounce_s=10)
LOCK_TTL_S = 3  # short, so that a dead worker's lock expires within the test

# The job body each RQ worker runs (instead of `python -m ml_backend worker --job ID`, which reads Label Studio):
# fine-tune on the COCO subset, always promoted (margin -1); MODEL_DIR/epochs-<project> sets a longer run.
JOB_CHILD = r"""
import sys
from pathlib import Path
repo, redis_url, model_dir, coco, job_id = sys.argv[1:6]
sys.path.insert(0, repo)
from trainer.data import load_coco
from trainer.finetune import FineTuneConfig
from trainer.jobs import run_job
from trainer.jobs_redis import RedisJobStore
from trainer.models import load_model
from trainer.runtime import Segmenter
store = RedisJobStore.from_url(redis_url)
project = store.job(int(job_id)).project
epochs_file = Path(model_dir) / f"epochs-{project}"
epochs = int(epochs_file.read_text()) if epochs_file.exists() else 1
config = FineTuneConfig(epochs=epochs, patience=epochs, max_objects_per_image=1, margin=-1.0)
run_job(store, int(job_id), Segmenter(load_model("lite_medsam")), load_coco(coco), Path(model_dir),
        config, keep_last=5)
"""


# -- the store and the lock alone ---------------------------------------------------------------------------
@pytest.fixture
def store(redis_url: str, request: pytest.FixtureRequest) -> RedisJobStore:
    return RedisJobStore.from_url(redis_url, prefix=f"t:{request.node.name}:")


def test_redis_store_coalesces_like_sqlite(store: RedisJobStore) -> None:
    job_id = check_min_annotations_and_debounce(store)
    joined = {store.record_event("1", "ANNOTATION_CREATED", 1, POLICY, now=120 + i)[1] for i in range(20)}
    joined -= {None}  # the first two events wait for MIN_ANNOTATIONS, the rest join one follow-up
    assert len(joined) == 1 and joined != {job_id}
    status = store.status("1")
    assert status["running"]["id"] == job_id and status["queued"]["id"] in joined
    assert store.count_events("1") == 24 and store.pending_annotations("1") == 0
    store.finish(job_id, "succeeded", result={"promoted": True})
    assert store.status("1")["last"]["result"] == {"promoted": True}


def test_expired_lock_fails_the_job_and_retries_it_once(store: RedisJobStore) -> None:
    job_id = store.record_event("7", "START_TRAINING", 0, POLICY, explicit=True)[1]
    lock = ProjectLock(store.redis, "7", ttl_s=1, prefix=store.prefix)
    assert lock.acquire() and not ProjectLock(store.redis, "7", ttl_s=1, prefix=store.prefix).acquire()
    assert store.claim_due(pid=os.getpid(), job_id=job_id) is not None
    held = lock_held(store.redis, store.prefix)
    time.sleep(2)
    assert store.reap(held) == [] and held("7")  # renewed: still held after its TTL
    lock._stop.set()  # the worker "dies": no more renewal
    lock._thread.join(5)
    woken: list[int] = []
    deadline = time.monotonic() + 10
    while not store.reap(held, lambda job, delay: woken.append(job)):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    first = store.job(job_id)
    assert first.state == "failed" and "stopped renewing" in first.error
    retry = store.job(woken[0])
    assert retry.state == "queued" and retry.retry_of == job_id and retry.trigger == "RETRY"
    assert store.claim_due(pid=os.getpid(), job_id=retry.id) is not None  # no lock taken: it "dies" again
    assert store.reap(held, lambda job, delay: woken.append(job)) == [retry.id] and len(woken) == 1  # no 2nd retry


# -- two RQ workers, one backend ----------------------------------------------------------------------------
class Cluster:
    def __init__(self, url: str, redis_url: str, model_dir: Path, workers: list[subprocess.Popen], logs: Path):
        self.url, self.redis_url, self.model_dir, self.workers, self.logs = url, redis_url, model_dir, workers, logs
        self.store = RedisJobStore.from_url(redis_url)

    def webhook(self, project: int) -> int:
        reply = requests.post(f"{self.url}/webhook", json={"action": "START_TRAINING", "project": {"id": project}},
                              timeout=10).json()
        assert reply["job"] is not None
        return reply["job"]

    def status(self, project: int) -> dict:
        return requests.get(f"{self.url}/train/status", params={"project": project}, timeout=10).json()

    def wait_state(self, job_id: int, states: tuple[str, ...], timeout: float = 240) -> dict:
        return wait_for(lambda: self.store.job(job_id).state in states and self.store.job(job_id), timeout,
                        f"job {job_id} {states}", log_path=self.logs / "rq-0.log")

    def tails(self) -> str:
        return "\n".join(log_tail(self.logs / f"rq-{i}.log", 2000) for i in range(len(self.workers)))


@pytest.fixture(scope="module")
def cluster(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("rq-scale")
    model_dir, coco = root / "models", make_coco(root / "coco", SUBSET)
    model_dir.mkdir()
    env = {"MODEL_DIR": str(model_dir), "REDIS_URL": redis_url, "WORKERS": "1", "LOG_LEVEL": "INFO",
           "TRAINING_LOCK_TTL_S": str(LOCK_TTL_S)}
    worker_env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO_")}
    worker_env.update(env)
    hooks = {"training_job_command": [sys.executable, "-c", JOB_CHILD, str(REPO), redis_url, str(model_dir),
                                      str(coco)]}
    workers = []
    try:
        for i in range(2):
            with open(root / f"rq-{i}.log", "wb") as log:
                workers.append(subprocess.Popen(
                    hooked.command(hooks, "rq.cli", "worker", "training", "--url", redis_url, "--with-scheduler",
                                   "--name", f"host-{i}"), cwd=REPO, env=worker_env, start_new_session=True,
                    stdout=log, stderr=subprocess.STDOUT))
        with start_backend(env, root / "gunicorn.log") as url:
            yield Cluster(url, redis_url, model_dir, workers, root)
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
                worker.wait(30)


def test_two_workers_train_two_projects_at_once_and_a_third_event_coalesces(cluster: Cluster) -> None:
    first_a, first_b = cluster.webhook(51), cluster.webhook(52)
    running = wait_for(lambda: len(cluster.status(51)["workers"]) == 2 and cluster.status(51)["workers"], 120,
                       "both projects running", log_path=cluster.logs / "rq-0.log")
    assert {r["job"] for r in running} == {first_a, first_b}
    assert {r["worker"].split("@")[0] for r in running} == {"host-0", "host-1"}  # two "hosts", a project each
    listed = subprocess.run([sys.executable, "-m", "ml_backend", "jobs", "--json"], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "REDIS_URL": cluster.redis_url,
                                                         "MODEL_DIR": str(cluster.model_dir), "LOG_LEVEL": "WARNING"})
    rows = {row["id"]: row for row in json.loads(listed.stdout.strip().splitlines()[-1])["jobs"]}
    assert {rows[r["job"]]["worker"] for r in running} == {r["worker"] for r in running}  # the CLI sees both hosts
    follow_up = cluster.webhook(51)  # project 51 runs: a follow-up is queued
    assert cluster.webhook(51) == follow_up != first_a  # and the third event joins it
    assert cluster.status(51)["queued"]["id"] == follow_up
    jobs = {j: cluster.wait_state(j, ("succeeded", "failed")) for j in (first_a, first_b, follow_up)}
    assert all(job.state == "succeeded" for job in jobs.values()), (jobs, cluster.tails())
    a, b, again = jobs[first_a], jobs[first_b], jobs[follow_up]
    assert a.started_at < b.finished_at and b.started_at < a.finished_at  # concurrently
    assert again.started_at >= a.finished_at  # never two jobs of project 51 at once
    for project, active in ((51, "v0002"), (52, "v0001")):
        status = cluster.status(project)
        assert status["active_version"] == active and status["running"] is None and status["queued"] is None
        assert registry_problems(cluster.model_dir, str(project)) == []


def test_kill_9_of_a_worker_mid_job(cluster: Cluster) -> None:
    """A worker host dies (kill -9 of its whole process group) mid-job: its project's lock expires, the job is
    failed and retried once on the other worker, whose own project's job is not disturbed; nothing half-written
    is served."""
    (cluster.model_dir / "epochs-61").write_text("400")  # long enough to be killed mid-run
    doomed = cluster.webhook(61)
    running = cluster.wait_state(doomed, ("running",), 120)
    wait_for(lambda: cluster.store.job(doomed).pid not in (None, int(running.worker.rsplit(":", 1)[1])), 60,
             "the training child started", log_path=cluster.logs / "rq-0.log", interval=0.1)
    other = cluster.webhook(62)  # goes to the other worker
    other_running = cluster.wait_state(other, ("running",), 120)
    assert other_running.worker.split("@")[0] != running.worker.split("@")[0]
    time.sleep(3)  # the doomed job is training now
    (cluster.model_dir / "epochs-61").write_text("1")  # its retry is short
    host = cluster.workers[int(running.worker.split("@")[0].removeprefix("host-"))]  # "host-<i>@machine:pid"
    horse = int(running.worker.rsplit(":", 1)[1])  # RQ runs each job in a work horse with a session of its own
    for group in (os.getpgid(horse), host.pid):  # the whole "host": the horse and the training child, the worker
        os.killpg(group, signal.SIGKILL)
    failed = cluster.wait_state(doomed, ("failed",), 60)
    assert "stopped renewing" in failed.error
    retry_id = wait_for(lambda: next((j.id for j in cluster.store.jobs("61") if j.retry_of == doomed), None), 30,
                        "the retry job")
    assert cluster.wait_state(other, ("succeeded", "failed")).state == "succeeded", cluster.tails()
    assert cluster.wait_state(retry_id, ("succeeded", "failed")).state == "succeeded", cluster.tails()
    for project in (61, 62):
        assert registry_problems(cluster.model_dir, str(project)) == []
        status = cluster.status(project)
        assert status["active_version"] == "v0001" and status["running"] is None
    assert cluster.status(61)["recent_errors"][0]["job"] == doomed


def test_cli_train_meets_the_redis_project_lock(redis_url: str, tmp_path: Path) -> None:
    """With REDIS_URL the command line takes the project's Redis lock, as RQ jobs do: `train --no-wait` of a
    project whose job runs (on any host) refuses with exit code 3 naming the job; another project is not blocked
    (it gets past the lock to its data, here a missing folder: exit code 2)."""
    store = RedisJobStore.from_url(redis_url)  # the prefix the backend and the CLI use
    job_id = store.record_event("cli-a", "START_TRAINING", 0, POLICY, explicit=True)[1]
    lock = ProjectLock(store.redis, "cli-a", ttl_s=30)
    assert lock.acquire()
    try:
        assert store.claim_due(pid=os.getpid(), job_id=job_id, worker="host-x@elsewhere:1") is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO_")}
        env.update(REDIS_URL=redis_url, MODEL_DIR=str(tmp_path), LOG_LEVEL="WARNING")

        def train(project: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "ml_backend", "train", "--project", project, "--no-wait",
                                   "--data", str(tmp_path / "missing")], cwd=REPO, env=env, capture_output=True,
                                  text=True, timeout=120)

        refused = train("cli-a")
        assert refused.returncode == 3 and f"project cli-a: job {job_id} (train) is running" in refused.stderr
        other = train("cli-b")
        assert other.returncode == 2 and "data path not found" in other.stderr, other.stderr
    finally:
        store.finish(job_id, "succeeded", result={})
        lock.release()
