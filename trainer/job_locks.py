"""Cross-process locks under MODEL_DIR/locks/ (flock): a project's lock (one job or command-line run of a project at
a time) and the host's job slots (TRAINING_CONCURRENCY), with who holds them for the messages of those who wait."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Callable, Iterator, Protocol

from .job_rules import Job


class RunningJobs(Protocol):
    def running(self, project: str) -> list[Job]: ...


LOCK_DIR = "locks"  # under MODEL_DIR


def _lock_path(model_dir: Path | str, name: str) -> Path:
    path = Path(model_dir) / LOCK_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def project_lock_path(model_dir: Path | str, project: str) -> Path:
    """MODEL_DIR/locks/project-<project>.lock (a hash for a name that is not a plain file name)."""
    name = project if re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}", project) else \
        "h-" + hashlib.sha256(project.encode()).hexdigest()[:24]
    return _lock_path(model_dir, f"project-{name}.lock")


def _try_flock(path: Path) -> int | None:
    """An fd holding an exclusive flock on path, or None when another open file holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_holder(fd: int, **holder: object) -> None:
    """Note who holds a lock (pid, host, what, since) in its file, for the messages of those who wait."""
    data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), **holder}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def lock_holder(model_dir: Path | str, project: str) -> dict | None:
    """What the project's lock file says about its holder (meaningful only while the lock is held)."""
    try:
        return json.loads(project_lock_path(model_dir, project).read_text() or "null")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def project_lock(model_dir: Path | str, project: str, wait_s: float = 0.0, on_busy: Callable[[], None] | None = None,
                 poll_s: float = 0.25) -> Iterator[int | None]:
    """The project's cross-process lock (flock): one job or command-line run of a project at a time. Waits up
    to `wait_s` seconds (calling `on_busy` once if it has to wait); yields the fd, or None when still held."""
    path = project_lock_path(model_dir, project)
    fd = _try_flock(path)
    if fd is None and wait_s > 0:
        if on_busy is not None:
            on_busy()
        deadline = time.monotonic() + wait_s
        while fd is None and time.monotonic() < deadline:
            time.sleep(poll_s)
            fd = _try_flock(path)
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def acquire_slot(model_dir: Path | str, concurrency: int) -> int | None:
    """One of the host's `concurrency` job slots (flock on MODEL_DIR/locks/slot-<i>.lock), or None when all are
    held. Every process sharing MODEL_DIR must use the same TRAINING_CONCURRENCY."""
    for index in range(max(1, concurrency)):
        fd = _try_flock(_lock_path(model_dir, f"slot-{index}.lock"))
        if fd is not None:
            return fd
    return None


def describe_busy(store: RunningJobs, model_dir: Path | str, project: str) -> str:
    """One line naming what holds the project's lock: its running job, else the lock file's holder."""
    running = store.running(project)
    holder = lock_holder(model_dir, project) or {}
    if running:
        job = running[-1]
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(job.started_at or job.created_at))
        return f"project {project}: job {job.id} ({job.kind}) is running since {since} (pid {job.pid})"
    what = holder.get("what", "another process")
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder["since"])) if "since" in holder else "?"
    return f"project {project}: {what} is running since {since} (pid {holder.get('pid', '?')} on {holder.get('host', '?')})"
