"""A real process holding a project's lock (as a job's runner does), for the lock tests of jobs and the CLI."""
from __future__ import annotations

import multiprocessing
from pathlib import Path

from trainer.jobs import project_lock, write_holder


def _hold_lock(model_dir: Path, project: str, ready, release) -> None:
    with project_lock(model_dir, project) as fd:
        assert fd is not None
        write_holder(fd, what="test holder")
        ready.set()
        release.wait(120)


class LockHolder:
    """Holds `project`'s lock in a child process from `with` entry until exit (or `release()`)."""

    def __init__(self, model_dir: Path, project: str) -> None:
        self.ready, self.released = multiprocessing.Event(), multiprocessing.Event()
        self.process = multiprocessing.Process(target=_hold_lock, args=(model_dir, project, self.ready, self.released))

    def __enter__(self) -> "LockHolder":
        self.process.start()
        assert self.ready.wait(30), "the lock holder did not start"
        return self

    def release(self) -> None:
        self.released.set()
        self.process.join(30)

    def __exit__(self, *exc: object) -> None:
        self.release()
