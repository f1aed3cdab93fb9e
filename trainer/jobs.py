"""Training jobs on SQLite (MODEL_DIR/jobs.sqlite): durable event and job records and their coalescing. The
rest of the job machinery, one concept a file: job_rules.py (the record, the trigger rule both stores apply),
job_locks.py (project locks, host slots), dispatcher.py (this store's runner), job_child.py (a job's child
process), jobs_redis.py (the Redis store and runner), jobs_schema.py (this store's schema).

- Every webhook event is committed to `events` before the backend answers (WAL, synchronous=NORMAL: a commit
  survives any crash of the process; a power loss may drop the last ones, which cost a trigger count only,
  as jobs read the annotations themselves from Label Studio).
- Per project at most one job is queued: events that arrive while a job is queued join it; events that
  arrive while one runs create (or join) the single follow-up job.
- Locks (flock, under MODEL_DIR/locks/): a runner holds its project's lock (`project-<name>.lock`) and one of
  `concurrency` host slots (`slot-<i>.lock`) while a job runs, so one project's jobs never run twice at once
  and at most `concurrency` jobs run at once across the processes sharing MODEL_DIR on a host. The command
  line's `train` and `prelabel` take the project's lock too (no slot: another project's job never blocks them).
- A job left "running" by a process that died is found by `recover`: a running job whose project lock is free
  has no live process (the runner and its child hold the lock until the job is recorded), so it is failed,
  never left stuck; jobs of projects whose lock is held are left alone.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterator

from .dispatcher import Dispatcher  # noqa: F401  (re-exported: the package's public names)
from .job_child import lower_priority, run_job  # noqa: F401
from .job_locks import (acquire_slot, describe_busy, lock_holder, project_lock, project_lock_path,  # noqa: F401
                        write_holder)
from .job_rules import DUPLICATE_WINDOW_S, PRELABEL, TRAIN, Job, TriggerPolicy, next_start  # noqa: F401
from .jobs_schema import ensure_schema


class JobStore:
    """Event and job records in one SQLite file (WAL; a commit survives a process crash before it returns)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        ensure_schema(self.path)  # safe with many processes opening a new store at once (jobs_schema.py)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row  # WAL: set once by ensure_schema, it stays with the file
            db.execute("PRAGMA synchronous=NORMAL")  # no fsync per commit: a burst of webhooks stays fast
            yield db
        finally:
            db.close()

    _writers: dict[str, threading.Lock] = {}  # one per database file in this process

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # Threads of one process queue on a lock (woken at once) instead of in SQLite's busy handler, whose
        # growing sleeps (up to 100 ms each) gave a burst of webhooks a tail of seconds.
        lock = self._writers.setdefault(str(self.path.resolve()), threading.Lock())
        with lock, self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    # -- events -> jobs -----------------------------------------------------------------------------
    def record_event(self, project: str, trigger: str, annotations: int, policy: TriggerPolicy,
                     now: float | None = None, key: str | None = None,
                     explicit: bool = False) -> tuple[int | None, int | None]:
        """Commit the event (`trigger` names it in the records; `explicit`: a person asked to train now) and apply
        `next_start`; returns (event id, job id it joined or None).
        key: what makes two deliveries one event (`ml_backend.webhooks`); an event whose key the project recorded
        within DUPLICATE_WINDOW_S is a duplicate (two webhooks to this backend): nothing is recorded,
        (None, None) is returned."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            if key is not None:
                db.execute("DELETE FROM event_keys WHERE received_at < ?", (now - DUPLICATE_WINDOW_S,))
                if db.execute("INSERT OR IGNORE INTO event_keys (project, key, received_at) VALUES (?,?,?)",
                              (project, key, now)).rowcount == 0:
                    return None, None
            event_id = db.execute("INSERT INTO events (project, action, annotations, received_at) VALUES (?,?,?,?)",
                                  (project, trigger, annotations, now)).lastrowid
            row = db.execute("SELECT * FROM jobs WHERE project=? AND state='queued' AND kind=?",
                             (project, TRAIN)).fetchone()
            queued = Job.from_row(row) if row is not None else None
            pending = db.execute("SELECT COALESCE(SUM(annotations), 0) FROM events WHERE project=? AND "
                                 "job_id IS NULL", (project,)).fetchone()[0]
            not_before = next_start(policy, explicit, queued, pending, now)
            if not_before is None:
                return event_id, None
            if queued is None:
                job_id = db.execute("INSERT INTO jobs (project, state, trigger, created_at, not_before, explicit) "
                                    "VALUES (?, 'queued', ?, ?, ?, ?)",
                                    (project, trigger, now, not_before, int(explicit))).lastrowid
            else:
                job_id = queued.id
                db.execute("UPDATE jobs SET not_before=?, trigger=?, explicit=? WHERE id=?",
                           (not_before, trigger if explicit else queued.trigger, int(explicit or queued.explicit),
                            job_id))
            db.execute("UPDATE events SET job_id=? WHERE project=? AND job_id IS NULL", (job_id, project))
            return event_id, job_id

    def enqueue(self, project: str, kind: str, trigger: str, now: float | None = None) -> tuple[int, bool]:
        """Queue a job of `kind` now, unless one of that kind is already queued for the project (joined);
        returns (job id, whether it is new)."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            queued = db.execute("SELECT id FROM jobs WHERE project=? AND state='queued' AND kind=?",
                                (project, kind)).fetchone()
            if queued is not None:
                return queued["id"], False
            return db.execute("INSERT INTO jobs (project, state, trigger, created_at, not_before, kind) "
                              "VALUES (?, 'queued', ?, ?, ?, ?)", (project, trigger, now, now, kind)).lastrowid, True

    def set_progress(self, job_id: int, progress: dict) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO job_progress (job_id, progress) VALUES (?, ?)",
                       (job_id, json.dumps(progress)))

    def progress(self, job_id: int) -> dict | None:
        with self._connect() as db:
            row = db.execute("SELECT progress FROM job_progress WHERE job_id=?", (job_id,)).fetchone()
        return json.loads(row["progress"]) if row else None

    def claim_due(self, pid: int, now: float | None = None, job_id: int | None = None) -> Job | None:
        """Mark the oldest due queued job (training before other kinds; or exactly `job_id`) running for
        process pid and return it."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE state='queued' AND not_before<=? AND (? IS NULL OR id=?) "
                             f"ORDER BY kind != '{TRAIN}', not_before, id LIMIT 1",
                             (now, job_id, job_id)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state='running', started_at=?, pid=? WHERE id=?", (now, pid, row["id"]))
            return self.job(row["id"], db)

    def set_pid(self, job_id: int, pid: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET pid=? WHERE id=?", (pid, job_id))

    def finish(self, job_id: int, state: str, result: dict | None = None, error: str | None = None) -> None:
        """Record a running job's end (succeeded or failed); a job already ended is left as it is."""
        assert state in ("succeeded", "failed")
        with self._transaction() as db:
            db.execute("UPDATE jobs SET state=?, finished_at=?, result=?, error=? WHERE id=? AND state='running'",
                       (state, time.time(), json.dumps(result) if result is not None else None, error, job_id))

    def due_jobs(self, now: float | None = None) -> list[Job]:
        """Queued jobs whose time has come, in claiming order: training first, then the oldest."""
        now = time.time() if now is None else now
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state='queued' AND not_before<=? "
                              f"ORDER BY kind != '{TRAIN}', not_before, id", (now,)).fetchall()
        return [Job.from_row(r) for r in rows]

    def running_projects(self) -> list[str]:
        with self._connect() as db:
            return [r[0] for r in db.execute("SELECT DISTINCT project FROM jobs WHERE state='running'")]

    def running(self, project: str) -> list[Job]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE project=? AND state='running' ORDER BY id",
                              (project,)).fetchall()
        return [Job.from_row(r) for r in rows]

    def recover(self, reason: str = "interrupted: the training process died", project: str | None = None) -> list[int]:
        """Fail the jobs still marked running (of `project`, or of all). Only call while holding that project's
        lock (every project's, when None): then no live process runs them."""
        query = "FROM jobs WHERE state='running' AND (? IS NULL OR project=?)"
        with self._connect() as db:
            if db.execute(f"SELECT COUNT(*) {query}", (project, project)).fetchone()[0] == 0:
                return []
        with self._transaction() as db:
            ids = [r["id"] for r in db.execute(f"SELECT id {query}", (project, project))]
            db.execute("UPDATE jobs SET state='failed', finished_at=?, error=? WHERE state='running' "
                       "AND (? IS NULL OR project=?)", (time.time(), reason, project, project))
        return ids

    def hand_back(self, job_id: int, now: float | None = None) -> int:
        """Queue again, due at once, a running job whose run a worker shutdown stopped. If the project already has
        a queued job of that kind (events that came in meanwhile), that one takes over its events and the stopped
        one is failed. Returns the id of the job that will run."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            job = self.job(job_id, db)
            if job is None or job.state != "running":
                return job_id
            queued = db.execute("SELECT id FROM jobs WHERE project=? AND state='queued' AND kind=?",
                                (job.project, job.kind)).fetchone()
            if queued is None:
                db.execute("UPDATE jobs SET state='queued', not_before=?, started_at=NULL, pid=NULL WHERE id=?",
                           (now, job_id))
                return job_id
            db.execute("UPDATE jobs SET state='failed', finished_at=?, error=? WHERE id=?",
                       (now, f"stopped by a worker shutdown; job {queued['id']} takes its place", job_id))
            db.execute("UPDATE events SET job_id=? WHERE job_id=?", (queued["id"], job_id))
            db.execute("UPDATE jobs SET not_before=MIN(not_before, ?) WHERE id=?", (now, queued["id"]))
            return queued["id"]

    # -- reading ------------------------------------------------------------------------------------
    def job(self, job_id: int, db: sqlite3.Connection | None = None) -> Job | None:
        if db is None:
            with self._connect() as db:
                return self.job(job_id, db)
        row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def jobs(self, project: str | None = None, limit: int = 100) -> list[Job]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE (? IS NULL OR project=?) ORDER BY id DESC LIMIT ?",
                              (project, project, limit)).fetchall()
        return [Job.from_row(r) for r in rows]

    def count_events(self, project: str | None = None) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM events WHERE (? IS NULL OR project=?)",
                              (project, project)).fetchone()[0]

    def pending_annotations(self, project: str) -> int:
        with self._connect() as db:
            return db.execute("SELECT COALESCE(SUM(annotations), 0) FROM events WHERE project=? AND job_id IS NULL",
                              (project,)).fetchone()[0]

    def status(self, project: str) -> dict:
        """Current and queued jobs, the last finished one, recent errors, annotations waiting for a job."""
        jobs = self.jobs(project, limit=50)
        finished = [j for j in jobs if j.state in ("succeeded", "failed")]
        trained = [j for j in finished if j.kind == TRAIN]
        return {"running": next((j.as_dict() for j in jobs if j.state == "running" and j.kind == TRAIN), None),
                "queued": next((j.as_dict() for j in jobs if j.state == "queued" and j.kind == TRAIN), None),
                "prelabel": [{**j.as_dict(), "progress": self.progress(j.id)} for j in jobs if j.kind == PRELABEL][:3],
                "last": trained[0].as_dict() if trained else None,
                "recent_errors": [{"job": j.id, "finished_at": j.finished_at, "error": j.error}
                                  for j in finished if j.state == "failed"][:5],
                "pending_annotations": self.pending_annotations(project),
                "events_recorded": self.count_events(project)}

