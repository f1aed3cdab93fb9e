"""Embedding images before anyone waits for them: tasks a /predict call deferred, tasks just imported, a
whole project when it is connected. One low-priority thread per backend process; it yields to live calls, its own
process's and (through `HostLiveCalls`) every other backend process's on the host."""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from trainer.cache import EmbeddingCache, image_key
from trainer.runtime import Segmenter

from .fetch import ImageError, ImageFetcher
from .host_calls import HostLiveCalls

log = logging.getLogger("ml_backend.prewarm")
NICENESS = 15  # the thread's (and its torch workers') scheduling priority: live calls come first
POLL_S = 0.05  # how often a held-back pre-warm looks at the other processes' live calls


class _Stopping(BaseException):
    """Raised inside the encoder (at a block boundary) when the process stops: the image is abandoned, so the
    thread is never inside torch when the interpreter finalizes (a daemon thread that wakes up inside torch's C++
    then aborts the process: "terminate called without an active exception")."""


@dataclass(frozen=True)
class ImageJob:
    """One task image to embed: where to load it from, its URL (a task's data value) and the task id."""

    loader: ImageFetcher
    url: str
    task_id: int | None = None


class Prewarmer:
    """A bounded, deduplicated queue of images and the thread that embeds them into the cache (to disk when
    the cache has one, so every worker and training share them; memory stays for live calls).

    The thread runs at low scheduling priority and yields to live calls (those inside `live()` of this process,
    and with `host` those of every backend process of the host): it starts an image only while none runs, and
    a torch encode already running pauses at the next encoder block (a forward pre-hook on every block) until they
    are done, unless a live call of this process waits for that very image (the cache is single-flight: it then
    finishes it for them). An ONNX Runtime encode cannot pause: it runs on worker threads of the thread's own low
    priority (trainer/onnx_encoder.py), so live calls' threads still come first.
    """

    def __init__(self, segmenter: Segmenter, cache: EmbeddingCache, max_queue: int, batch: int = 1,
                 host: HostLiveCalls | None = None) -> None:
        self.segmenter = segmenter
        self.cache = cache
        self.max_queue = max_queue
        self.batch = max(1, batch)  # images per encoder forward (more than 1 pays on a GPU)
        self.host = host
        self.counts: Counter[str] = Counter()
        self._soon: deque[ImageJob] = deque()  # opened, imported or deferred tasks: taken first
        self._backlog: deque[ImageJob] = deque()  # a project's listing
        self._pending: set[tuple[int, str]] = set()
        self._live = 0
        self._busy = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._current_keys: tuple[str, ...] = ()
        self._stopping = False
        for module in segmenter.model.sam.image_encoder.modules():
            if isinstance(module, torch.nn.ModuleList):
                for block in module:
                    block.register_forward_pre_hook(self._yield_point)

    def _yield_point(self, module: torch.nn.Module, args: tuple) -> None:
        """Inside the encoder, in the pre-warm thread only: wait while live calls run."""
        if self._thread is None or threading.get_ident() != self._thread.ident:
            return
        if self._stopping:
            raise _Stopping()
        with self._cond:
            while (self._held_back() and not self._stopping
                   and not any(self.cache.waited_for(k) for k in self._current_keys)):
                self._cond.wait(POLL_S)

    def _held_back(self) -> bool:
        """A live call runs: in this process, or in another backend process of the host."""
        return bool(self._live) or (self.host is not None and self.host.others_live())

    def submit(self, jobs: Iterable[ImageJob], first: bool = False, soon: bool = False) -> int:
        """Queue images not already queued; returns how many were accepted (the rest: queued or queue full).
        first: the images someone is about to need (a task just opened in the editor) go to the front of the
        queue, moved there when already queued. soon: the images people will ask for next (tasks just imported,
        tasks a Retrieve predictions call deferred) go after those but ahead of the backlog (a project's listing),
        moved there when already in it."""
        accepted = 0
        jobs = list(jobs)
        with self._cond:
            for job in reversed(jobs) if first else jobs:
                ident = (id(job.loader), job.url)
                if ident in self._pending:
                    if first and (moved := self._take(ident, self._soon, self._backlog)) is not None:
                        self._soon.appendleft(moved)
                    elif soon and (moved := self._take(ident, self._backlog)) is not None:
                        self._soon.append(moved)
                    continue
                if len(self._soon) + len(self._backlog) >= self.max_queue and not first:
                    self.counts["dropped"] += 1
                    continue
                self._pending.add(ident)
                if first:
                    self._soon.appendleft(job)
                elif soon:
                    self._soon.append(job)
                else:
                    self._backlog.append(job)
                accepted += 1
            if accepted or first or soon:  # a job moved ahead may be waiting for the thread too
                self._start()
                self._cond.notify_all()
        return accepted

    @staticmethod
    def _take(ident: tuple[int, str], *queues: deque[ImageJob]) -> ImageJob | None:
        """Remove the queued job `ident` from the first of `queues` that holds it; None when none does (it runs)."""
        for queue in queues:
            for index, queued in enumerate(queue):
                if (id(queued.loader), queued.url) == ident:
                    del queue[index]
                    return queued
        return None

    def queued(self) -> list[ImageJob]:
        """The queue in the order the thread takes it."""
        with self._cond:
            return [*self._soon, *self._backlog]

    @contextmanager
    def live(self) -> Iterator[None]:
        """Wrap a live call: no new image is started while one runs (in any backend process of the host)."""
        with self._cond:
            self._live += 1
        try:
            if self.host is not None:
                with self.host.mark():
                    yield
            else:
                yield
        finally:
            with self._cond:
                self._live -= 1
                self._cond.notify_all()

    def status(self) -> dict:
        with self._cond:
            return {"queued": len(self._soon) + len(self._backlog), "running": self._busy, **self.counts}

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until the queue is empty and no image is being embedded (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._soon or self._backlog or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop the thread (at the process's exit): the queue is dropped and an encode in progress is abandoned at
        its next encoder block. Returns whether the thread has ended within `timeout_s`."""
        with self._cond:
            self._stopping = True
            self._soon.clear()
            self._backlog.clear()
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        return thread is None or not thread.is_alive()

    def _start(self) -> None:
        if self._stopping:
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="prewarm", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:  # Linux: a thread's nice value is its own, and the torch workers it starts inherit it
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)
        except (AttributeError, OSError):
            pass
        while True:
            with self._cond:
                while (not (self._soon or self._backlog) or self._held_back()) and not self._stopping:
                    self._cond.wait(POLL_S if self._soon or self._backlog else None)
                if self._stopping:
                    return
                jobs = [(self._soon or self._backlog).popleft()
                        for _ in range(min(self.batch, len(self._soon) + len(self._backlog)))]
                self._busy = True
            try:
                self._warm(jobs)
            except _Stopping:
                return
            finally:
                with self._cond:
                    for job in jobs:
                        self._pending.discard((id(job.loader), job.url))
                    self._busy = False
                    self._cond.notify_all()

    def _warm(self, jobs: list[ImageJob]) -> None:
        """Load the images; embed the ones not cached (one forward for all of them when batching)."""
        started = time.perf_counter()
        new = []
        for job in jobs:
            try:
                image = job.loader.load(job.url, job.task_id)
            except ImageError as exc:
                log.warning("prewarm image failed", extra={"task": job.task_id, "error": str(exc)})
                self._done(job, "failed", started)
                continue
            key = image_key(self.segmenter.encoder_identity, image)
            if self.cache.contains(key):
                self._done(job, "cached", started)
            else:
                new.append((job, image, key))
        if not new:
            return
        self._current_keys = tuple(key for _, _, key in new)
        try:
            if len(new) == 1:  # single-flight with live calls that want the same image
                (_, image, key), = new
                self.cache.get_or_compute(key, lambda: self.segmenter.embed(image), keep_in_memory=False)
            else:
                for (_, _, key), embedding in zip(new, self.segmenter.embed_many([image for _, image, _ in new])):
                    self.cache.put(key, embedding, keep_in_memory=False)
            outcome = "embedded"
        except Exception as exc:  # never let one image stop the thread
            log.exception("prewarm error", extra={"tasks": [job.task_id for job, _, _ in new],
                                                  "error": type(exc).__name__})
            outcome = "failed"
        finally:
            self._current_keys = ()
        for job, _, _ in new:
            self._done(job, outcome, started)

    def _done(self, job: ImageJob, outcome: str, started: float) -> None:
        self.counts[outcome] += 1
        log.info("prewarm image", extra={"task": job.task_id, "outcome": outcome, "queued": len(self._soon) + len(self._backlog),
                                         "ms": round(1000 * (time.perf_counter() - started), 1)})
