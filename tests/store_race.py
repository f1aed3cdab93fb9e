"""A process that opens a job store when released (tests/test_startup.py); small, so that each of the many
processes that race starts fast."""
from __future__ import annotations

from trainer.jobs import JobStore, TriggerPolicy


def open_store(path: str, barrier, results) -> None:
    barrier.wait(60)  # released together: the race the issue saw with WORKERS >= 2
    try:
        JobStore(path).record_event("1", "ANNOTATION_CREATED", 1, TriggerPolicy(10, 30))
        results.put("ok")
    except Exception as exc:  # reported, not raised: the test names every failure
        results.put(f"{type(exc).__name__}: {exc}")
