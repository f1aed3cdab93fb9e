"""Where a worker's model work runs: a few low-priority threads, with the editor's calls first.

gunicorn gives every request a thread; the model work of /predict (encoder + decoder, per task) runs instead in
PREDICT_CONCURRENCY compute threads at a lower scheduling priority (nice 5; their torch threads inherit it), so
that request threads stay free and quick for light requests (webhooks, /setup) however busy the CPU is. A
Retrieve predictions batch queues one task at a time, so an interactive click waits for at most one task.
"""
from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, TypeVar

T = TypeVar("T")
NICENESS = 5


class Deferred(Exception):
    """The work did not start before its deadline."""


class ComputePool:
    """`workers` threads at `niceness`; queued interactive work runs before queued batch work, FIFO within each."""

    def __init__(self, workers: int, niceness: int = NICENESS) -> None:
        self.workers = max(1, workers)
        self.niceness = niceness
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopped = False

    def run(self, work: Callable[[], T], interactive: bool, timeout_s: float | None = None) -> T:
        """work() in a compute thread; its result or its exception. Deferred when it has not started within
        `timeout_s` (once started it runs to its end)."""
        self._start()
        future: Future = Future()
        with self._lock:
            if self._stopped:
                raise Deferred()  # the process is stopping: no new work
            self._queue.put((0 if interactive else 1, next(self._order), work, future))
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:
            if future.cancel():
                raise Deferred() from None
            return future.result()

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Let the threads finish the work they run, then end (at the process's exit: a thread still inside
        torch when the interpreter finalizes aborts the process). Queued work that has not started is
        Deferred. Returns whether every thread has ended within `timeout_s`."""
        with self._lock:
            threads, self._stopped = list(self._threads), True
        while True:
            try:
                *_, future = self._queue.get_nowait()
            except queue.Empty:
                break
            if future.set_running_or_notify_cancel():
                future.set_exception(Deferred())
        for _ in threads:
            self._queue.put((-1, -1, None, None))  # before any queued work: "end now"
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)

    def _start(self) -> None:
        with self._lock:
            while len(self._threads) < self.workers:
                thread = threading.Thread(target=self._serve, name=f"compute-{len(self._threads)}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _serve(self) -> None:
        try:  # Linux: a thread's nice value is its own, and the torch threads it starts inherit it
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.niceness)
        except (AttributeError, OSError):
            pass
        while True:
            _, _, work, future = self._queue.get()
            if work is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(work())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)
