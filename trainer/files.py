"""Atomic file writes (readers see the old file or the new one, never a part of either) and the blocking
cross-process lock that guards making such a file once."""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def write_atomic(path: Path, write: Callable[[Path], None], mode: int = 0o644, fsync: bool = True,
                 before_replace: Callable[[], None] | None = None) -> None:
    """write(tmp) fills a temporary file beside `path` (same directory, so the rename is atomic); it then
    gets `mode`, is flushed to disk when `fsync`, and replaces `path` in one rename. On any error the
    temporary file is removed and `path` is untouched."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, mode)
        write(tmp)
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        if before_replace:
            before_replace()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (created if missing), blocking until another process releases it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock
