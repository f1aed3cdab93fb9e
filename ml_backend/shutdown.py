"""A serving process's clean exit: its background threads end before the interpreter finalizes.

Python finalizes with daemon threads still running; one that then wakes up inside torch's C++ code (the
pre-warm thread in the middle of an encode, a compute thread finishing a task) is ended by the interpreter
through a C++ frame that may not be unwound, and the process aborts: "terminate called without an active
exception", SIGABRT, which gunicorn reports for each worker on every stop. So at exit (atexit, which runs after
gunicorn has finished the requests in flight and before finalization) every live backend stops its pre-warm
thread (abandoning an encode at its next encoder block), ends an ONNX export in progress (its child process) and
lets its compute threads finish what they run.
The training dispatcher and the Redis reaper only ever wait in C (sleep, sqlite, a child process), where
ending them is harmless.
"""
from __future__ import annotations

import atexit
import logging
import time
import weakref
from typing import Protocol

log = logging.getLogger("ml_backend")
PREWARM_STOP_S = 25.0  # an encode is abandoned at its next encoder block: under a second on an idle CPU, seconds
# when the host is busy (the thread runs at nice 15); below gunicorn's 30 s graceful stop, after which it kills
EXPORT_STOP_S = 10.0  # an export child ends at SIGTERM; loading an export takes about a second
COMPUTE_STOP_S = 30.0  # a task that runs is finished (gunicorn's graceful stop already waited for requests)


class _Stoppable(Protocol):
    def stop(self, timeout_s: float) -> bool: ...


class _Backend(Protocol):
    prewarmer: _Stoppable
    segmenter: _Stoppable
    compute: _Stoppable


_live: "weakref.WeakSet[_Backend]" = weakref.WeakSet()
_registered = False


def stop_at_exit(backend: _Backend) -> None:
    """Stop this backend's threads when the process exits (once per process however many backends)."""
    global _registered
    _live.add(backend)
    if not _registered:
        atexit.register(stop_all)
        _registered = True


def stop_all() -> bool:
    """Stop every live backend's threads; returns whether all ended (a line names those that did not)."""
    began = time.monotonic()
    stopped = True
    for backend in list(_live):
        for name, part, timeout_s in (("prewarm", backend.prewarmer, PREWARM_STOP_S),
                                      ("encoder export", backend.segmenter, EXPORT_STOP_S),
                                      ("compute", backend.compute, COMPUTE_STOP_S)):
            if not part.stop(timeout_s):
                stopped = False
                log.warning("thread still running at exit", extra={"thread": name, "waited_s": timeout_s})
    if _live and _can_log():
        log.info("stopped", extra={"clean": stopped, "ms": round(1000 * (time.monotonic() - began), 1)})
    return stopped


def _can_log() -> bool:
    """Whether the log's streams are still open at exit (a host such as pytest may have closed them first)."""
    logger: logging.Logger | None = log
    while logger is not None:
        if any(getattr(getattr(h, "stream", None), "closed", False) for h in logger.handlers):
            return False
        logger = logger.parent if logger.propagate else None
    return True
