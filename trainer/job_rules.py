"""What a job is and when it starts: the record both job stores keep (SQLite: trainer/jobs.py, Redis:
trainer/jobs_redis.py) and the trigger and coalescing rule they both apply (`next_start`, a pure function)."""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass

TRAIN, PRELABEL = "train", "prelabel"  # job kinds; training is claimed first
DUPLICATE_WINDOW_S = 7 * 86400  # an event's key is remembered this long (two webhooks deliver within seconds)


@dataclass(frozen=True)
class Job:
    id: int
    project: str
    state: str
    trigger: str
    created_at: float
    not_before: float
    started_at: float | None
    finished_at: float | None
    pid: int | None
    result: dict | None
    error: str | None
    kind: str = TRAIN
    worker: str | None = None    # host:pid of the runner (Redis store; SQLite: the pid column only)
    retry_of: int | None = None  # the job this one retries (Redis store: a run whose worker died)
    explicit: bool = False       # asked for by a person ("train now"): its start is not pushed back by edits

    @classmethod
    def from_row(cls, row: sqlite3.Row | dict) -> "Job":
        data = dict(row)
        data["explicit"] = bool(data.get("explicit"))
        if isinstance(data.get("result"), str):
            data["result"] = json.loads(data["result"]) if data["result"] else None
        return cls(**data)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class TriggerPolicy:
    """An explicit request ("train now") schedules at once; annotation events once `min_annotations` new
    completed annotations are pending, after `debounce_s` of quiet (each new event pushes the start back)."""

    min_annotations: int = 10
    debounce_s: float = 30.0


def next_start(policy: TriggerPolicy, explicit: bool, queued: Job | None, pending: int, now: float) -> float | None:
    """When the project's training job starts after an event (its `not_before`), or None: no job yet.

    explicit: the event asks for training now; queued: the project's queued training job, which the event joins
    (None: a new job is made); pending: completed annotations not yet in a job, this event's included.
    Per project at most one training job is queued: an event joins it, pushing its start back by `debounce_s`,
    except that an explicit job's start is never delayed by later edits."""
    if explicit:
        return now
    if queued is not None and queued.explicit:
        return queued.not_before
    if queued is None and pending < policy.min_annotations:
        return None
    return now + policy.debounce_s
