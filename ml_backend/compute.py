"""How many tasks a worker computes at once (encoder + decoder), with the editor's calls first.

gunicorn gives every request a thread; the slots keep the CPU (or GPU) from being shared by more tasks than
pays, so that threads stay free for light requests (webhooks, /setup) and a Retrieve predictions batch, which
takes a slot per task, lets an interactive click in after at most one task.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class ComputeSlots:
    """At most `slots` holders at once; waiting interactive callers go before waiting batch callers."""

    def __init__(self, slots: int) -> None:
        self._free = max(1, slots)
        self._interactive_waiting = 0
        self._cond = threading.Condition()

    @contextmanager
    def slot(self, interactive: bool, timeout_s: float | None = None) -> Iterator[bool]:
        """Hold a slot for the block; yields False (holding none) when `timeout_s` passed first."""
        with self._cond:
            if interactive:
                self._interactive_waiting += 1
            try:
                got = self._cond.wait_for(
                    lambda: self._free > 0 and (interactive or not self._interactive_waiting), timeout_s)
            finally:
                if interactive:
                    self._interactive_waiting -= 1
            if got:
                self._free -= 1
            self._cond.notify_all()  # batch callers held back by this interactive one look again
        try:
            yield got
        finally:
            if got:
                with self._cond:
                    self._free += 1
                    self._cond.notify_all()
