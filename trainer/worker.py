"""Runs queued training jobs: one at a time across processes, each in its own low-priority child process."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

from .data import Dataset
from .finetune import FineTuneConfig, train_and_register
from .jobs import Job, JobStore, training_lock
from .registry import Registry
from .runtime import Segmenter

log = logging.getLogger("trainer.worker")


class Dispatcher:
    """Claims due jobs and runs `job_command + [job id]` as a child process, holding the training lock.

    The child inherits the lock, so if this process dies the lock stays held until the child ends; if the
    child dies, its job is marked failed here; if both die, the next dispatcher's `recover` fails the job.
    """

    def __init__(self, store: JobStore, model_dir: Path, job_command: list[str],
                 env: dict[str, str] | None = None) -> None:
        self.store = store
        self.model_dir = Path(model_dir)
        self.job_command = job_command
        self.env = env
        self._stop = threading.Event()

    def run_once(self) -> Job | None:
        """Run at most one due job to its end; returns it, or None when nothing ran."""
        with training_lock(self.model_dir) as fd:
            if fd is None:
                return None
            for job_id in self.store.recover():
                log.warning("job recovered as failed", extra={"job": job_id})
            job = self.store.claim_due(os.getpid())
            if job is None:
                return None
            started = time.perf_counter()
            log.info("job started", extra={"job": job.id, "project": job.project, "trigger": job.trigger})
            child = subprocess.Popen([*self.job_command, str(job.id)], pass_fds=(fd,), env=self.env)
            self.store.set_pid(job.id, child.pid)
            code = child.wait()
            if code != 0:
                why = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                self.store.finish(job.id, "failed", error=f"training process {why}")
            finished = self.store.job(job.id)
            log.info("job finished", extra={"job": job.id, "project": job.project, "state": finished.state,
                                            "seconds": round(time.perf_counter() - started, 1),
                                            "error": finished.error})
            return finished

    def run_due(self) -> int:
        """Run jobs until none is due (or the lock is held elsewhere); returns how many ran."""
        count = 0
        while not self._stop.is_set() and self.run_once() is not None:
            count += 1
        return count

    def loop(self, poll_s: float = 1.0) -> None:
        while not self._stop.is_set():
            try:
                self.run_due()
            except Exception:  # a broken store or spawn must not kill the serving process's thread
                log.exception("dispatcher iteration failed")
            self._stop.wait(poll_s)

    def start_thread(self, poll_s: float = 1.0) -> threading.Thread:
        thread = threading.Thread(target=self.loop, args=(poll_s,), name="training-dispatcher", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()


def run_job(store: JobStore, job_id: int, segmenter: Segmenter, load_dataset: Callable[[str], Dataset],
            model_dir: Path, config: FineTuneConfig, keep_last: int) -> dict:
    """The body of one job (in the child process): fetch the project's data, fine-tune, gate, record."""
    job = store.job(job_id)
    if job is None or job.state != "running":
        raise RuntimeError(f"job {job_id} is not running")
    try:
        os.nice(10)
    except OSError:
        pass
    try:
        dataset = load_dataset(job.project)
        registry = Registry(model_dir, job.project, keep_last=keep_last)
        report = train_and_register(segmenter, dataset, registry, model_dir, config, progress=False)
    except Exception as exc:
        store.finish(job_id, "failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    result = {k: v for k, v in report.items() if k != "curves"}
    store.finish(job_id, "succeeded", result=result)
    return result
