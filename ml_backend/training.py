"""Training from the backend's side: webhook events become jobs; a job's entry loads the project from Label
Studio and hands it to the core (trainer.jobs.run_job -> trainer.finetune).

    python -m ml_backend worker              run due jobs forever (the docker-compose training worker)
    python -m ml_backend worker --job ID     one job (what the dispatcher starts as a child process)
    rq worker training --url $REDIS_URL --with-scheduler    with REDIS_URL: jobs go through RQ, and Redis holds
                                             the job records and the projects' locks (trainer.jobs_redis)
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import Callable, Iterator

from trainer.finetune import FineTuneConfig
from trainer.data import Dataset, DataError
from trainer.jobs import (PRELABEL, TRAIN, Dispatcher, JobStore, TriggerPolicy, describe_busy, lower_priority,
                          project_lock, run_job, write_holder)
from trainer.jobs_redis import ProjectLock, RedisJobStore, RedisRunner
from trainer.registry import Registry, RegistryError
from trainer.runtime import BASE_VERSION

from .annotations import load_label_studio_project
from .label_studio import ConnectError, for_project
from .settings import Settings

log = logging.getLogger("ml_backend.training")
# What runs one job (`+ [job id]`) in its child process, for both runners; the tests set a job body that needs no
# Label Studio here (tests/hooked.py), never through the environment.
job_command: list[str] = [sys.executable, "-m", "ml_backend", "worker", "--job"]
RQ_QUEUE = "training"
RQ_JOB_TIMEOUT_S = 6 * 3600
EXIT_BUSY = 3  # the command line refused (--no-wait): the project's lock is held


class LocalJobs:
    """Job records in SQLite under MODEL_DIR, run by a dispatcher that polls them: a thread of each backend worker
    (TRAINING_RUNNER=embedded) or `python -m ml_backend worker`; the project's lock is a flock under MODEL_DIR."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: JobStore | RedisJobStore = JobStore(settings.model_dir / "jobs.sqlite")

    def start(self) -> None:
        """The backend process's part: the embedded runner's dispatcher thread."""
        if self.settings.runner == "embedded":
            dispatcher(self.settings).start_thread()

    def wake(self, job_id: int) -> None:
        """A job is due or queued: the dispatcher finds it when it next polls the store."""

    def reap(self) -> None:
        """Dead runners' jobs: the dispatcher recovers them itself (their flocks died with them)."""

    def workers(self) -> list[dict] | None:
        """Every running job across hosts (None: one host, the store's own rows say it)."""
        return None

    @contextlib.contextmanager
    def lock(self, project: str, what: str, wait_s: float, on_busy: Callable[[], None]) -> Iterator[bool]:
        """The project's lock for a command-line run (the one its jobs hold), waiting up to `wait_s` (calling
        `on_busy` once); yields whether it is held."""
        with project_lock(self.settings.model_dir, project, wait_s=wait_s, on_busy=on_busy) as fd:
            if fd is not None:
                write_holder(fd, what=what)
            yield fd is not None


class RqJobs(LocalJobs):
    """Job records and the projects' locks in Redis (REDIS_URL), run by RQ workers on any host: a job is woken by
    an RQ task, a dead host's job is failed (and retried once) when its lock expires."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = _redis_store(settings.redis_url)

    def start(self) -> None:
        threading.Thread(target=self._reap_forever, name="training-reaper", daemon=True).start()

    def _reap_forever(self) -> None:
        """Every half lock-lifetime, so a dead host's job is failed and retried even when all is idle."""
        period = max(1.0, self.settings.training_lock_ttl_s / 2)
        while True:
            time.sleep(period)
            try:
                self.reap()
            except Exception as exc:  # Redis away for a moment: the next round tries again
                log.warning("reaping failed", extra={"error": str(exc)})

    def wake(self, job_id: int) -> None:
        """Tell RQ when the job is due: once per job and due time (a marker in Redis), as the RQ task hands a job
        that is not yet due back for later itself."""
        job = self.store.job(job_id)
        delay = max(0.0, job.not_before - time.time())
        if self.store.first_wake(job_id, delay + 120):
            rq_wake(self.settings, job_id, delay)

    def reap(self) -> None:
        redis_runner(self.settings).reap()

    def workers(self) -> list[dict] | None:
        return self.store.workers()

    @contextlib.contextmanager
    def lock(self, project: str, what: str, wait_s: float, on_busy: Callable[[], None]) -> Iterator[bool]:
        lock = ProjectLock(self.store.redis, project, self.settings.training_lock_ttl_s)  # renewed while held
        held = lock.acquire()
        if not held and wait_s > 0:
            on_busy()
            held = lock.acquire(wait_s)
        try:
            yield held
        finally:
            if held:
                lock.release()


def jobs(settings: Settings) -> LocalJobs:
    """The one place that chooses where jobs live and who runs them: RQ with REDIS_URL (several hosts), else
    SQLite under MODEL_DIR."""
    return RqJobs(settings) if settings.runner == "rq" and settings.redis_url else LocalJobs(settings)


def job_store(settings: Settings) -> JobStore | RedisJobStore:
    return jobs(settings).store


@functools.lru_cache(maxsize=4)
def _redis_store(url: str) -> RedisJobStore:
    return RedisJobStore.from_url(url)  # one connection pool per process (redis-py resets it after a fork)


def dispatcher(settings: Settings) -> Dispatcher:
    return Dispatcher(job_store(settings), settings.model_dir, job_command, concurrency=settings.training_concurrency)


def rq_wake(settings: Settings, job_id: int, delay_s: float = 0.0) -> None:
    """Have an RQ worker look at the job in `delay_s` seconds (training jobs go to the front of the queue)."""
    from rq import Queue

    store = job_store(settings)
    queue = Queue(RQ_QUEUE, connection=store.redis)
    if delay_s > 0:
        queue.enqueue_in(timedelta(seconds=delay_s + 0.2), rq_run_job, job_id, job_timeout=RQ_JOB_TIMEOUT_S)
    else:
        job = store.job(job_id)
        queue.enqueue(rq_run_job, job_id, job_timeout=RQ_JOB_TIMEOUT_S,
                      at_front=job is not None and job.kind == TRAIN)


def redis_runner(settings: Settings) -> RedisRunner:
    """The Redis runner of this process; inside an RQ task its records name the RQ worker (name@host:pid)."""
    from rq import get_current_job

    current = get_current_job()
    return RedisRunner(job_store(settings), job_command, lambda job_id, delay: rq_wake(settings, job_id, delay),
                       lock_ttl_s=settings.training_lock_ttl_s, name=current.worker_name if current else None)


def rq_run_job(job_id: int) -> str:
    """The RQ task (REDIS_URL): run one job under its project's Redis lock, or hand it back for later."""
    return redis_runner(Settings.from_env()).run(job_id)


class Training:
    """What the HTTP layer needs: record events durably, wake the runner, report status."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.jobs = jobs(settings)
        self.store = self.jobs.store
        self.policy = TriggerPolicy(settings.min_annotations, settings.train_debounce_s)
        self.jobs.start()

    def record(self, project: str, action: str, annotations: int, key: str | None = None,
               explicit: bool = False) -> tuple[int | None, int | None]:
        """Record a webhook event (event id, job id); (None, None) for a duplicate delivery of `key`. explicit:
        a person asked to train now (webhooks.WebhookEvent.explicit)."""
        event_id, job_id = self.store.record_event(project, action, annotations, self.policy, key=key,
                                                   explicit=explicit)
        if job_id is not None:
            self.jobs.wake(job_id)
        return event_id, job_id

    def prelabel(self, project: str) -> tuple[int, bool]:
        """Queue a pre-labelling job for the project (joins a queued one); returns (job id, new)."""
        job_id, new = self.store.enqueue(project, PRELABEL, "PRELABEL")
        self.jobs.wake(job_id)
        return job_id, new

    def model_versions(self, segmenter, project: str | None = None) -> list[str]:
        """model_version strings: the base model's, then every kept version of the project (of every project
        when None), newest first."""
        root = self.settings.model_dir / "projects"
        names = [project] if project else sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        kept = []
        for name in names:
            try:
                kept += [segmenter.model_version(v.version) for v in reversed(Registry(self.settings.model_dir,
                                                                                      name).versions())]
            except RegistryError:
                continue
        return list(dict.fromkeys([segmenter.model_version(BASE_VERSION), *kept]))

    def status(self, project: str) -> dict:
        registry = Registry(self.settings.model_dir, project)
        versions = [v.summary() for v in registry.versions()]
        status = {"project": project, "runner": self.settings.runner,
                  "active_version": registry.active() or BASE_VERSION, "versions": versions}
        self.jobs.reap()  # a status read also fails (and retries) a dead worker's job
        workers = self.jobs.workers()
        if workers is not None:
            status["workers"] = workers  # every running job, across hosts
        return {**status, **self.store.status(project)}


def load_project(settings: Settings, project: str) -> Dataset:
    """A job's data: the project's completed annotations and images, through its one Label Studio client."""
    client = for_project(settings, project)
    client.require()
    return load_label_studio_project(client)


def run_one_job(settings: Settings, job_id: int, segmenter) -> int:
    """The child process's body (the edge's job entry): load the project's data through Label Studio, have the
    core fine-tune, gate and record it (trainer.jobs.run_job), then follow the served version in Label Studio
    (or pre-label the project); exit code 0 or 1."""
    runner = jobs(settings)
    store = runner.store
    job = store.job(job_id)
    if job is not None and job.kind == PRELABEL:
        return run_prelabel_job(settings, store, job_id, segmenter)
    if job is None or job.state != "running":
        log.error("job failed", extra={"job": job_id, "error": "not running"})
        return 1
    lower_priority()
    config = FineTuneConfig(epochs=settings.train_epochs, max_objects_per_image=settings.train_objects_per_image,
                            margin=settings.promotion_margin)
    try:
        dataset = load_project(settings, job.project)
    except (ConnectError, DataError, OSError) as exc:
        store.finish(job_id, "failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        log.error("job failed", extra={"job": job_id, "error": str(exc)})
        return 1
    try:
        result = run_job(store, job_id, segmenter, dataset, settings.model_dir, config, settings.keep_versions)
    except (RuntimeError, RegistryError, ValueError) as exc:
        log.error("job failed", extra={"job": job_id, "error": str(exc)})
        return 1
    log.info("job succeeded", extra={"job": job_id, **result})
    if result.get("promoted"):  # the score column moves once Label Studio holds predictions of the version
        outcome = for_project(settings, job.project).follow_served_version(result["model_version"])
        log.info("label studio model version", extra={"job": job_id, "project": job.project, "outcome": outcome})
    if result.get("promoted") and settings.prelabel_on_promote:
        prelabel_id, _ = store.enqueue(job.project, PRELABEL, "PROMOTED")
        runner.wake(prelabel_id)
        log.info("prelabel queued after promotion", extra={"job": prelabel_id, "project": job.project})
    return 0


def run_prelabel_job(settings: Settings, store: JobStore, job_id: int, segmenter, bar: bool = False) -> int:
    """A claimed pre-labelling job: progress in the job record, the counts as its result; exit code 0 or 1."""
    from .backend import SamBackend
    from .prelabel import PrelabelError, prelabel_project

    job = store.job(job_id)
    backend = SamBackend(dataclasses.replace(settings, prewarm=False), segmenter)
    try:
        report = prelabel_project(settings, job.project, backend, lambda p: store.set_progress(job_id, p), bar)
    except (PrelabelError, RuntimeError, ValueError, OSError) as exc:
        store.finish(job_id, "failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        log.error("job failed", extra={"job": job_id, "error": str(exc)})
        return 1
    store.finish(job_id, "succeeded", result=report)
    return 0


def prelabel_now(settings: Settings, project: str, segmenter, wait_s: float = 6 * 3600) -> tuple[int | None, int]:
    """The command line's pre-labelling: take the project's lock (waiting up to `wait_s`, with a message on
    stderr; 0: refuse at once), then queue (or join) the project's pre-labelling job and run it here (tqdm bar);
    returns (job id, exit code), (None, EXIT_BUSY) when the project stayed busy."""
    runner = jobs(settings)
    store = runner.store
    busy = lambda: print(f"{describe_busy(store, settings.model_dir, project)}; waiting for it to end",  # noqa: E731
                         file=sys.stderr, flush=True)
    with runner.lock(project, "python -m ml_backend prelabel", wait_s, busy) as held:
        if not held:
            print(f"error: {describe_busy(store, settings.model_dir, project)}; not pre-labelling "
                  f"(retry later{'' if wait_s else ' or without --no-wait'})", file=sys.stderr)
            return None, EXIT_BUSY
        store.recover(project=project)  # we hold the lock: a job of the project still "running" is dead
        job_id, _ = store.enqueue(project, PRELABEL, "CLI")
        if store.claim_due(os.getpid(), job_id=job_id) is None:
            return job_id, 1
        return job_id, run_prelabel_job(settings, store, job_id, segmenter, bar=sys.stderr.isatty())


def serve(settings: Settings) -> int:
    """Run due jobs until SIGTERM or SIGINT (the training worker); then stop the running job's process and hand
    its job back to the queue, so `docker compose stop` takes a second and the next worker runs the job."""
    worker = dispatcher(settings)

    def stop(signum: int, frame: object) -> None:
        log.info("training worker stopping", extra={"signal": signal.Signals(signum).name})
        worker.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("training worker started", extra={"model_dir": str(settings.model_dir)})
    worker.loop()
    log.info("training worker stopped")
    return 0
