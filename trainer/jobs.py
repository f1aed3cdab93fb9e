"""Training jobs: durable event and job records (SQLite under MODEL_DIR), coalescing, per-project locks, and
the dispatcher that runs each job in its own low-priority child process.

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
import fcntl
import hashlib
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .data import Dataset
from .finetune import FineTuneConfig, train_and_register
from .registry import Registry
from .runtime import Segmenter

log = logging.getLogger("trainer.jobs")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, project TEXT NOT NULL, action TEXT NOT NULL,
    annotations INTEGER NOT NULL, received_at REAL NOT NULL, job_id INTEGER);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, project TEXT NOT NULL, state TEXT NOT NULL,
    trigger TEXT NOT NULL, created_at REAL NOT NULL, not_before REAL NOT NULL,
    started_at REAL, finished_at REAL, pid INTEGER, result TEXT, error TEXT);
CREATE INDEX IF NOT EXISTS jobs_project_state ON jobs (project, state);
CREATE TABLE IF NOT EXISTS job_progress (job_id INTEGER PRIMARY KEY, progress TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_project_job ON events (project, job_id);
"""
ACTIVE_STATES = ("queued", "running")
TRAIN, PRELABEL = "train", "prelabel"  # job kinds; training is claimed first


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

    @classmethod
    def from_row(cls, row: sqlite3.Row | dict) -> "Job":
        data = dict(row)
        if isinstance(data.get("result"), str):
            data["result"] = json.loads(data["result"]) if data["result"] else None
        return cls(**data)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class TriggerPolicy:
    """START_TRAINING always schedules at once; annotation events once `min_annotations` new completed
    annotations are pending, after `debounce_s` of quiet (each new event pushes the start back)."""

    min_annotations: int = 10
    debounce_s: float = 30.0


class JobStore:
    """Event and job records in one SQLite file (WAL; a commit survives a process crash before it returns)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)
            if "kind" not in {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}:
                db.execute(f"ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT '{TRAIN}'")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
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
    def record_event(self, project: str, action: str, annotations: int, policy: TriggerPolicy,
                     now: float | None = None) -> tuple[int, int | None]:
        """Commit the event and apply the trigger policy; returns (event id, job id it joined or None)."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            event_id = db.execute("INSERT INTO events (project, action, annotations, received_at) VALUES (?,?,?,?)",
                                  (project, action, annotations, now)).lastrowid
            queued = db.execute("SELECT * FROM jobs WHERE project=? AND state='queued' AND kind=?",
                                (project, TRAIN)).fetchone()
            if action == "START_TRAINING":
                not_before = now
            elif queued is not None and queued["trigger"] == "START_TRAINING":
                not_before = queued["not_before"]  # an explicit request is not delayed by later edits
            else:
                pending = db.execute("SELECT COALESCE(SUM(annotations), 0) FROM events WHERE project=? AND "
                                     "job_id IS NULL", (project,)).fetchone()[0]
                if queued is None and pending < policy.min_annotations:
                    return event_id, None
                not_before = now + policy.debounce_s  # debounce: wait for a quiet moment
            if queued is None:
                job_id = db.execute("INSERT INTO jobs (project, state, trigger, created_at, not_before) "
                                    "VALUES (?, 'queued', ?, ?, ?)", (project, action, now, not_before)).lastrowid
            else:
                job_id = queued["id"]
                trigger = "START_TRAINING" if action == "START_TRAINING" else queued["trigger"]
                db.execute("UPDATE jobs SET not_before=?, trigger=? WHERE id=?", (not_before, trigger, job_id))
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


def describe_busy(store: JobStore, model_dir: Path | str, project: str) -> str:
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


@dataclass
class _Claim:
    job: Job
    slot_fd: int
    project_fd: int


class Dispatcher:
    """Claims due jobs and runs `job_command + [job id]` as child processes, up to `concurrency` at once per
    host, each holding its project's lock and a host slot.

    The child inherits both locks, so if this process dies they stay held until the child ends; if the child
    dies, its job is marked failed here; if both die, the next dispatcher's `recover` fails the job.
    """

    def __init__(self, store: JobStore, model_dir: Path, job_command: list[str],
                 env: dict[str, str] | None = None, concurrency: int = 1) -> None:
        self.store = store
        self.model_dir = Path(model_dir)
        self.job_command = job_command
        self.env = env
        self.concurrency = max(1, concurrency)

    def recover(self) -> list[int]:
        """Fail the running jobs of every project whose lock is free (their processes died)."""
        failed: list[int] = []
        for project in self.store.running_projects():
            with project_lock(self.model_dir, project) as fd:
                if fd is not None:
                    failed += self.store.recover(project=project)
        for job_id in failed:
            log.warning("job recovered as failed", extra={"job": job_id})
        return failed

    def claim(self) -> _Claim | None:
        """Take a free slot, then the first due job (training first) whose project's lock is free; mark it
        running. None when no slot is free or no such job is due."""
        slot_fd = acquire_slot(self.model_dir, self.concurrency)
        if slot_fd is None:
            return None
        try:
            for candidate in self.store.due_jobs():
                project_fd = _try_flock(project_lock_path(self.model_dir, candidate.project))
                if project_fd is None:
                    continue  # that project's job runs elsewhere: its next job waits, other projects go on
                try:
                    self.store.recover(project=candidate.project)
                    job = self.store.claim_due(os.getpid(), job_id=candidate.id)
                    if job is not None:
                        write_holder(project_fd, what=f"job {job.id} ({job.kind})", job=job.id)
                        return _Claim(job, slot_fd, project_fd)
                except BaseException:
                    os.close(project_fd)
                    raise
                os.close(project_fd)
        except BaseException:
            os.close(slot_fd)
            raise
        os.close(slot_fd)
        return None

    def _run(self, claim: _Claim) -> Job:
        """Run a claimed job's child to its end, record a crash, release the locks."""
        job = claim.job
        started = time.perf_counter()
        try:
            log.info("job started", extra={"job": job.id, "project": job.project, "kind": job.kind,
                                           "trigger": job.trigger})
            try:
                child = subprocess.Popen([*self.job_command, str(job.id)], pass_fds=(claim.slot_fd, claim.project_fd),
                                         env=self.env)
            except OSError as exc:
                self.store.finish(job.id, "failed", error=f"could not start the training process: {exc}"[:2000])
                raise
            self.store.set_pid(job.id, child.pid)
            code = child.wait()
            if code != 0:
                why = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                self.store.finish(job.id, "failed", error=f"training process {why}")
            else:  # a no-op when the child recorded its end, as it should
                self.store.finish(job.id, "failed", error="training process exited without recording the job's end")
        finally:
            os.close(claim.project_fd)
            os.close(claim.slot_fd)
        finished = self.store.job(job.id)
        log.info("job finished", extra={"job": job.id, "project": job.project, "state": finished.state,
                                        "seconds": round(time.perf_counter() - started, 1), "error": finished.error})
        return finished

    def run_once(self) -> Job | None:
        """Run at most one due job to its end; returns it, or None when nothing ran."""
        self.recover()
        claim = self.claim()
        return None if claim is None else self._run(claim)

    def run_due(self, poll_s: float = 0.5) -> int:
        """Run jobs, up to `concurrency` at once, until none is due and none of ours runs; returns how many
        ran (0 when the slots or the due projects' locks are held elsewhere)."""
        self.recover()
        running: list[threading.Thread] = []
        count = 0
        while True:
            while (claim := self.claim()) is not None:
                thread = threading.Thread(target=self._run_logged, args=(claim,), name=f"job-{claim.job.id}",
                                          daemon=True)
                thread.start()
                running.append(thread)
                count += 1
            running = [t for t in running if t.is_alive()]
            if not running:
                return count
            running[0].join(poll_s)

    def _run_logged(self, claim: _Claim) -> None:
        try:
            self._run(claim)
        except Exception:
            log.exception("job run failed", extra={"job": claim.job.id})

    def loop(self, poll_s: float = 1.0) -> None:
        while True:
            try:
                self.run_due()
            except Exception:  # a broken store or spawn must not kill the serving process's thread
                log.exception("dispatcher iteration failed")
            time.sleep(poll_s)

    def start_thread(self, poll_s: float = 1.0) -> threading.Thread:
        thread = threading.Thread(target=self.loop, args=(poll_s,), name="training-dispatcher", daemon=True)
        thread.start()
        return thread


def run_job(store: JobStore, job_id: int, segmenter: Segmenter, load_dataset: Callable[[str], Dataset],
            model_dir: Path, config: FineTuneConfig, keep_last: int) -> dict:
    """The body of one job (in the child process): fetch the project's data, fine-tune, gate, record."""
    job = store.job(job_id)
    if job is None or job.state != "running":
        raise RuntimeError(f"job {job_id} is not running")
    try:
        os.nice(10)
    except OSError:
        pass
    try:
        dataset = load_dataset(job.project)
        registry = Registry(model_dir, job.project, keep_last=keep_last)
        report = train_and_register(segmenter, dataset, registry, model_dir, config, progress=False)
    except Exception as exc:
        store.finish(job_id, "failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    result = {k: v for k, v in report.items() if k != "curves"}
    store.finish(job_id, "succeeded", result=result)
    return result
