"""Training jobs from the backend's side: record webhook events, wake the runner, run a job.

    python -m ml_backend.worker              run due jobs forever (the docker-compose training worker)
    python -m ml_backend.worker run-job ID   one job (what the dispatcher starts as a child process)
    rq worker training --url $REDIS_URL --with-scheduler    with REDIS_URL: jobs go through RQ
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import timedelta

from trainer.finetune import FineTuneConfig
from trainer.jobs import JobStore, TriggerPolicy
from trainer.models import load_model
from trainer.registry import Registry, RegistryError
from trainer.runtime import BASE_VERSION, Segmenter
from trainer.worker import Dispatcher, run_job

from .annotations import load_label_studio_project, task_image_loader
from .logs import configure
from .settings import Settings

log = logging.getLogger("ml_backend.worker")
JOB_COMMAND = [sys.executable, "-m", "ml_backend.worker", "run-job"]
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
        if job_id is not None and self._queue is not None:
            job = self.store.job(job_id)
            delay = max(0.0, job.not_before - time.time())
            self._queue.enqueue_in(timedelta(seconds=delay + 0.5), rq_run_due_jobs, job_timeout=6 * 3600)
        return event_id, job_id

    def status(self, project: str) -> dict:
        registry = Registry(self.settings.model_dir, project)
        versions = [{"version": v.version, "promoted": v.promoted, "reason": v.manifest.get("reason"),
                     "val_miou": v.manifest.get("metrics", {}).get("val_miou_new"),
                     "created_at": v.manifest.get("created_at")} for v in registry.versions()]
        return {"project": project, "runner": self.settings.runner, "active_version": registry.active() or BASE_VERSION,
                "versions": versions, **self.store.status(project)}


def _load_project(settings: Settings, project: str):
    from .backend import image_source

    source = image_source(settings, project)
    if not source.label_studio_url or not source.token:
        raise RuntimeError(f"project {project}: no Label Studio URL/token (set LABEL_STUDIO_URL and "
                           "LABEL_STUDIO_API_KEY, or connect the project so /setup provides them)")
    return load_label_studio_project(int(project), source, task_image_loader(source))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ml_backend.worker")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run due training jobs forever (default)")
    one = sub.add_parser("run-job", help="run one claimed job (started by the dispatcher)")
    one.add_argument("job_id", type=int)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    configure(settings.log_level)
    if args.command == "run-job":
        model = load_model(settings.sam_model, settings.sam_checkpoint, settings.sam_checkpoint_sha256,
                           settings.device)
        config = FineTuneConfig(epochs=settings.train_epochs, max_objects_per_image=settings.train_objects_per_image,
                                margin=settings.promotion_margin)
        try:
            result = run_job(job_store(settings), args.job_id, Segmenter(model), lambda p: _load_project(settings, p),
                             settings.model_dir, config, settings.keep_versions)
        except (RuntimeError, RegistryError, ValueError) as exc:
            log.error("job failed", extra={"job": args.job_id, "error": str(exc)})
            return 1
        log.info("job succeeded", extra={"job": args.job_id, **result})
        return 0
    log.info("training worker started", extra={"model_dir": str(settings.model_dir)})
    dispatcher(settings).loop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
