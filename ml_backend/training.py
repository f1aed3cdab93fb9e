"""Training from the backend's side: webhook events become jobs; a job's entry loads the project from Label
Studio and hands it to the core (trainer.jobs.run_job -> trainer.finetune).

    python -m ml_backend worker              run due jobs forever (the docker-compose training worker)
    python -m ml_backend worker --job ID     one job (what the dispatcher starts as a child process)
    rq worker training --url $REDIS_URL --with-scheduler    with REDIS_URL: jobs go through RQ
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from datetime import timedelta

from trainer.finetune import FineTuneConfig
from trainer.jobs import PRELABEL, Dispatcher, JobStore, TriggerPolicy, run_job, training_lock
from trainer.registry import Registry, RegistryError
from trainer.runtime import BASE_VERSION

from .annotations import load_label_studio_project, task_image_loader
from .fetch import image_source
from .settings import Settings

log = logging.getLogger("ml_backend.training")
JOB_COMMAND = [sys.executable, "-m", "ml_backend", "worker", "--job"]
RQ_QUEUE = "training"


def job_store(settings: Settings) -> JobStore:
    return JobStore(settings.model_dir / "jobs.sqlite")


def dispatcher(settings: Settings) -> Dispatcher:
    return Dispatcher(job_store(settings), settings.model_dir, JOB_COMMAND)


def rq_run_due_jobs() -> int:
    """The RQ task: run every due job (settings from the worker's environment)."""
    return dispatcher(Settings.from_env()).run_due()


class Training:
    """What the HTTP layer needs: record events durably, wake the runner, report status."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = job_store(settings)
        self.policy = TriggerPolicy(settings.min_annotations, settings.train_debounce_s)
        self._queue = None
        if settings.runner == "rq":
            from redis import Redis
            from rq import Queue

            self._queue = Queue(RQ_QUEUE, connection=Redis.from_url(settings.redis_url))
        self._dispatcher = dispatcher(settings) if settings.runner == "embedded" else None
        if self._dispatcher:
            self._dispatcher.start_thread()

    def record(self, project: str, action: str, annotations: int) -> tuple[int, int | None]:
        event_id, job_id = self.store.record_event(project, action, annotations, self.policy)
        if job_id is not None:
            self._wake(job_id)
        return event_id, job_id

    def prelabel(self, project: str) -> tuple[int, bool]:
        """Queue a pre-labelling job for the project (joins a queued one); returns (job id, new)."""
        job_id, new = self.store.enqueue(project, PRELABEL, "PRELABEL")
        self._wake(job_id)
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

    def _wake(self, job_id: int) -> None:
        """Tell RQ when the job is due (the embedded and worker runners poll the store)."""
        if self._queue is not None:
            job = self.store.job(job_id)
            delay = max(0.0, job.not_before - time.time())
            self._queue.enqueue_in(timedelta(seconds=delay + 0.5), rq_run_due_jobs, job_timeout=6 * 3600)

    def status(self, project: str) -> dict:
        registry = Registry(self.settings.model_dir, project)
        versions = [{"version": v.version, "promoted": v.promoted, "reason": v.manifest.get("reason"),
                     "val_miou": v.manifest.get("metrics", {}).get("val_miou_new"),
                     "created_at": v.manifest.get("created_at")} for v in registry.versions()]
        return {"project": project, "runner": self.settings.runner, "active_version": registry.active() or BASE_VERSION,
                "versions": versions, **self.store.status(project)}


def load_project(settings: Settings, project: str):
    """A job's data: the project's completed annotations and images, through Label Studio."""
    source = image_source(settings, project)
    if not source.label_studio_url or not source.token:
        raise RuntimeError(f"project {project}: no Label Studio URL/token (set LABEL_STUDIO_URL and "
                           "LABEL_STUDIO_API_KEY, or connect the project so /setup provides them)")
    return load_label_studio_project(int(project), source, task_image_loader(source))


def run_one_job(settings: Settings, job_id: int, segmenter) -> int:
    """The child process's body: fine-tune on the project's data, gate, record (or pre-label the project);
    exit code 0 or 1."""
    store = job_store(settings)
    job = store.job(job_id)
    if job is not None and job.kind == PRELABEL:
        return run_prelabel_job(settings, store, job_id, segmenter)
    config = FineTuneConfig(epochs=settings.train_epochs, max_objects_per_image=settings.train_objects_per_image,
                            margin=settings.promotion_margin)
    try:
        result = run_job(job_store(settings), job_id, segmenter, lambda p: load_project(settings, p),
                         settings.model_dir, config, settings.keep_versions)
    except (RuntimeError, RegistryError, ValueError) as exc:
        log.error("job failed", extra={"job": job_id, "error": str(exc)})
        return 1
    log.info("job succeeded", extra={"job": job_id, **result})
    if result.get("promoted") and settings.prelabel_on_promote:
        prelabel_id, _ = store.enqueue(job.project, PRELABEL, "PROMOTED")
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


def prelabel_now(settings: Settings, project: str, segmenter, wait_s: float = 6 * 3600) -> tuple[int, int]:
    """The command line's pre-labelling: queue the job, then run it here (tqdm bar) as soon as no other job
    runs (the runners' lock); returns (job id, exit code)."""
    store = job_store(settings)
    job_id, _ = store.enqueue(project, PRELABEL, "CLI")
    deadline = time.monotonic() + wait_s
    told = False
    while time.monotonic() < deadline:
        job = store.job(job_id)
        if job.state in ("succeeded", "failed"):  # a runner took it meanwhile
            return job_id, 0 if job.state == "succeeded" else 1
        if job.state == "queued":
            with training_lock(settings.model_dir) as fd:
                if fd is not None:
                    store.recover()
                    if store.claim_due(os.getpid(), job_id=job_id) is not None:
                        return job_id, run_prelabel_job(settings, store, job_id, segmenter, bar=sys.stderr.isatty())
        if not told:
            print(f"job {job_id}: waiting for the running job to end", file=sys.stderr)
            told = True
        time.sleep(2)
    return job_id, 1


def serve(settings: Settings) -> int:
    """Run due jobs forever (the training worker)."""
    log.info("training worker started", extra={"model_dir": str(settings.model_dir)})
    dispatcher(settings).loop()
    return 0
