"""A job's child process, from both sides: the runner's (start it, record how it ended: `start_child`,
`record_exit`, shared by the SQLite dispatcher and the Redis runner) and the child's own core (`run_job`)."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .job_rules import Job

if TYPE_CHECKING:  # the job store and runners import this module without torch: only run_job needs the model
    from .data import Dataset
    from .finetune import FineTuneConfig
    from .runtime import Segmenter


class JobRecords(Protocol):
    """What the child's runner writes to a job store (trainer.jobs.JobStore, trainer.jobs_redis.RedisJobStore)."""

    def job(self, job_id: int) -> Job | None: ...
    def set_pid(self, job_id: int, pid: int) -> None: ...
    def finish(self, job_id: int, state: str, result: dict | None = None, error: str | None = None) -> None: ...


def start_child(store: JobRecords, job_id: int, command: list[str], env: dict[str, str] | None = None,
                pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """Start `command + [job id]` and record its pid; a start that fails fails the job (and raises)."""
    try:
        child = subprocess.Popen([*command, str(job_id)], pass_fds=pass_fds, env=env)
    except OSError as exc:
        store.finish(job_id, "failed", error=f"could not start the training process: {exc}"[:2000])
        raise
    store.set_pid(job_id, child.pid)
    return child


def record_exit(store: JobRecords, job_id: int, code: int) -> None:
    """Record a child's end by its exit code; a no-op when the child recorded the job's end, as it should."""
    if code != 0:
        why = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        store.finish(job_id, "failed", error=f"training process {why}")
    else:
        store.finish(job_id, "failed", error="training process exited without recording the job's end")


def lower_priority(increment: int = 10) -> None:
    """Run this process (a job's child) below serving's priority; a no-op where the OS refuses."""
    try:
        os.nice(increment)
    except OSError:
        pass


def run_job(store: JobRecords, job_id: int, segmenter: Segmenter, dataset: Dataset, model_dir: Path,
            config: FineTuneConfig, keep_last: int) -> dict:
    """The core of one training job (in its child process, on the data the edge loaded): fine-tune, gate,
    register, record the end in the store."""
    job = store.job(job_id)
    if job is None or job.state != "running":
        raise RuntimeError(f"job {job_id} is not running")
    try:
        from .finetune import train_and_register
        from .registry import Registry

        registry = Registry(model_dir, job.project, keep_last=keep_last)
        report = train_and_register(segmenter, dataset, registry, model_dir, config, progress=False)
    except Exception as exc:
        store.finish(job_id, "failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    result = {k: v for k, v in report.items() if k != "curves"}
    store.finish(job_id, "succeeded", result=result)
    return result
