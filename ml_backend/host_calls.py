"""Live calls across a host's backend processes, so that pre-warm in every gunicorn worker yields to a live call in
any of them (each worker has its own pre-warm thread; without this, one worker's pre-warm competes with another
worker's /predict for the same cores).

A live call is a file in a host-local folder (the system's temporary directory, one folder per MODEL_DIR) named
after its process: created when the call starts, removed when it ends. A file whose process is gone (killed
mid-call) or that is older than `STALE_S` (a reused process id) does not count and is removed.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

STALE_S = 900.0  # longer than any call: PREDICT_DEADLINE_S bounds batches, an interactive call is one image


class HostLiveCalls:
    """The live calls of every process on this host that serves one MODEL_DIR."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._numbers = itertools.count()

    @classmethod
    def for_model_dir(cls, model_dir: Path) -> "HostLiveCalls":
        digest = hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:16]
        return cls(Path(tempfile.gettempdir()) / f"sam-backend-live-{os.getuid()}-{digest}")

    @contextmanager
    def mark(self) -> Iterator[None]:
        """Wrap a live call of this process."""
        path = self.folder / f"{os.getpid()}-{next(self._numbers)}"
        try:
            path.touch()
        except OSError:  # the folder was removed (a tmp cleaner): the call runs, unmarked
            path = None
        try:
            yield
        finally:
            if path is not None:
                path.unlink(missing_ok=True)

    def others_live(self) -> bool:
        """Whether another process of this host has a live call (this process's own calls are its business)."""
        me = os.getpid()
        now = time.time()
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return False
        for entry in entries:
            try:
                pid = int(entry.name.split("-", 1)[0])
                if pid == me:
                    continue
                if _alive(pid) and now - entry.stat().st_mtime < STALE_S:
                    return True
                os.unlink(entry.path)  # a killed process's (or a reused process id's) leftover
            except (ValueError, OSError):
                continue
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
