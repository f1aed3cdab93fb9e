"""The SQLite store's runner: claims due jobs and runs each in its own low-priority child process, up to
TRAINING_CONCURRENCY at once per host, under the project's lock and a host slot (trainer/job_locks.py)."""
from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .job_child import record_exit, start_child
from .job_locks import _try_flock, acquire_slot, project_lock, project_lock_path, write_holder
from .job_rules import Job

if TYPE_CHECKING:
    from .jobs import JobStore

log = logging.getLogger("trainer.jobs")


@dataclass
class _Claim:
    job: Job
    slot_fd: int
    project_fd: int


class Dispatcher:
    """Claims due jobs and runs `job_command + [job id]` as child processes, up to `concurrency` at once per
    host, each holding its project's lock and a host slot.

    The child inherits both locks, so if this process dies they stay held until the child ends; if the child
    dies, its job is marked failed here; if both die, the next dispatcher's `recover` fails the job.
    """

    def __init__(self, store: JobStore, model_dir: Path, job_command: list[str],
                 env: dict[str, str] | None = None, concurrency: int = 1) -> None:
        self.store = store
        self.model_dir = Path(model_dir)
        self.job_command = job_command
        self.env = env
        self.concurrency = max(1, concurrency)
        self._stopping = threading.Event()
        self._children: dict[int, subprocess.Popen] = {}  # job id -> its running child

    def stop(self) -> None:
        """Shut down (a worker's SIGTERM): claim no more jobs, stop the running children; `_run` hands their
        jobs back to the queue, and `loop` returns once they are."""
        self._stopping.set()
        for child in list(self._children.values()):
            child.terminate()

    def recover(self) -> list[int]:
        """Fail the running jobs of every project whose lock is free (their processes died)."""
        failed: list[int] = []
        for project in self.store.running_projects():
            with project_lock(self.model_dir, project) as fd:
                if fd is not None:
                    failed += self.store.recover(project=project)
        for job_id in failed:
            log.warning("job recovered as failed", extra={"job": job_id})
        return failed

    def claim(self) -> _Claim | None:
        """Take a free slot, then the first due job (training first) whose project's lock is free; mark it
        running. None when no slot is free or no such job is due."""
        slot_fd = acquire_slot(self.model_dir, self.concurrency)
        if slot_fd is None:
            return None
        try:
            for candidate in self.store.due_jobs():
                project_fd = _try_flock(project_lock_path(self.model_dir, candidate.project))
                if project_fd is None:
                    continue  # that project's job runs elsewhere: its next job waits, other projects go on
                try:
                    self.store.recover(project=candidate.project)
                    job = self.store.claim_due(os.getpid(), job_id=candidate.id)
                    if job is not None:
                        write_holder(project_fd, what=f"job {job.id} ({job.kind})", job=job.id)
                        return _Claim(job, slot_fd, project_fd)
                except BaseException:
                    os.close(project_fd)
                    raise
                os.close(project_fd)
        except BaseException:
            os.close(slot_fd)
            raise
        os.close(slot_fd)
        return None

    def _run(self, claim: _Claim) -> Job:
        """Run a claimed job's child to its end, record a crash, release the locks."""
        job = claim.job
        started = time.perf_counter()
        try:
            log.info("job started", extra={"job": job.id, "project": job.project, "kind": job.kind,
                                           "trigger": job.trigger})
            child = start_child(self.store, job.id, self.job_command, self.env, (claim.slot_fd, claim.project_fd))
            self._children[job.id] = child
            if self._stopping.is_set():
                child.terminate()
            code = child.wait()
            self._children.pop(job.id, None)
            if code != 0 and self._stopping.is_set():
                taken_by = self.store.hand_back(job.id)
                log.info("job handed back", extra={"job": job.id, "project": job.project, "queued_as": taken_by})
            else:
                record_exit(self.store, job.id, code)
        finally:
            os.close(claim.project_fd)
            os.close(claim.slot_fd)
        finished = self.store.job(job.id)
        log.info("job finished", extra={"job": job.id, "project": job.project, "state": finished.state,
                                        "seconds": round(time.perf_counter() - started, 1), "error": finished.error})
        return finished

    def run_once(self) -> Job | None:
        """Run at most one due job to its end; returns it, or None when nothing ran."""
        self.recover()
        claim = self.claim()
        return None if claim is None else self._run(claim)

    def run_due(self, poll_s: float = 0.5) -> int:
        """Run jobs, up to `concurrency` at once, until none is due and none of ours runs; returns how many
        ran (0 when the slots or the due projects' locks are held elsewhere)."""
        self.recover()
        running: list[threading.Thread] = []
        count = 0
        while True:
            while not self._stopping.is_set() and (claim := self.claim()) is not None:
                thread = threading.Thread(target=self._run_logged, args=(claim,), name=f"job-{claim.job.id}",
                                          daemon=True)
                thread.start()
                running.append(thread)
                count += 1
            running = [t for t in running if t.is_alive()]
            if not running:
                return count
            running[0].join(poll_s)

    def _run_logged(self, claim: _Claim) -> None:
        try:
            self._run(claim)
        except Exception:
            log.exception("job run failed", extra={"job": claim.job.id})

    def loop(self, poll_s: float = 1.0) -> None:
        """Run due jobs until `stop` (forever in the serving process's thread)."""
        while not self._stopping.is_set():
            try:
                self.run_due()
            except Exception:  # a broken store or spawn must not kill the serving process's thread
                log.exception("dispatcher iteration failed")
            self._stopping.wait(poll_s)

    def start_thread(self, poll_s: float = 1.0) -> threading.Thread:
        thread = threading.Thread(target=self.loop, args=(poll_s,), name="training-dispatcher", daemon=True)
        thread.start()
        return thread


