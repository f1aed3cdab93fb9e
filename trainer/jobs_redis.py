"""Training jobs on Redis (REDIS_URL): job records, coalescing and per-project locks live in Redis, so RQ workers
on several hosts that share MODEL_DIR run different projects' jobs at once.

- `RedisJobStore` keeps the `JobStore` interface (the same rule: job_rules.next_start), with job records as
  JSON under `<prefix>job:<id>`; every write runs under one short store lock (a Redis lock with expiry), the
  counterpart of SQLite's `BEGIN IMMEDIATE`.
- A project's lock is a Redis lock with expiry (`<prefix>lock:<project>`, redis-py's `Lock`: a random token, set
  with NX and PX, extended and released only by its owner). The runner renews it every third of its TTL while the
  job's child process runs; if renewal fails (the lock expired, e.g. the host was cut off), it kills the child
  so that two writers of one project never overlap for longer than a renewal period.
- A worker host that dies stops renewing: once the lock has expired, `reap` (run by every runner before and
  during its job, and by every status read) fails the job ("interrupted: ...") and queues one retry (or joins
  the project's queued follow-up); a retry that dies too is failed, not retried again.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from typing import Callable, Iterator

from .job_child import record_exit, start_child
from .job_rules import DUPLICATE_WINDOW_S, TRAIN, Job, TriggerPolicy, next_start
from .jobs import JobStore

log = logging.getLogger("trainer.jobs_redis")
PREFIX = "sam:jobs:"
Wake = Callable[[int, float], None]  # (job id, seconds from now): have a runner look at the job then


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class RedisJobStore:
    """Job records, events counters and coalescing in Redis; the `JobStore` interface."""

    def __init__(self, redis, prefix: str = PREFIX) -> None:
        self.redis = redis
        self.prefix = prefix

    @classmethod
    def from_url(cls, url: str, prefix: str = PREFIX) -> "RedisJobStore":
        from redis import Redis

        return cls(Redis.from_url(url, socket_timeout=30, health_check_interval=30), prefix)

    def _key(self, *parts: object) -> str:
        return self.prefix + ":".join(p.decode() if isinstance(p, bytes) else str(p) for p in parts)

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """Serialise the store's read-modify-write steps (a few round trips each)."""
        with self.redis.lock(self._key("write"), timeout=10, blocking_timeout=30, thread_local=False):
            yield

    def _save(self, job: dict) -> None:
        self.redis.set(self._key("job", job["id"]), json.dumps(job))

    def _load(self, job_id: int | str | None) -> dict | None:
        raw = self.redis.get(self._key("job", job_id)) if job_id is not None else None
        return json.loads(raw) if raw else None

    def _new_job(self, project: str, kind: str, trigger: str, now: float, not_before: float,
                 retry_of: int | None = None, explicit: bool = False) -> dict:
        job_id = int(self.redis.incr(self._key("next_job")))
        job = {"id": job_id, "project": project, "state": "queued", "trigger": trigger, "created_at": now,
               "not_before": not_before, "started_at": None, "finished_at": None, "pid": None, "result": None,
               "error": None, "kind": kind, "worker": None, "retry_of": retry_of,
               "explicit": explicit}
        pipe = self.redis.pipeline()
        pipe.set(self._key("job", job_id), json.dumps(job))
        pipe.zadd(self._key("project", project, "jobs"), {str(job_id): job_id})
        pipe.zadd(self._key("all"), {str(job_id): job_id})
        pipe.zadd(self._key("queued"), {str(job_id): not_before})
        pipe.set(self._key("project", project, "queued", kind), job_id)
        pipe.execute()
        return job

    # -- events -> jobs -----------------------------------------------------------------------------
    def record_event(self, project: str, trigger: str, annotations: int, policy: TriggerPolicy,
                     now: float | None = None, key: str | None = None,
                     explicit: bool = False) -> tuple[int | None, int | None]:
        """Count the event and apply `next_start`; returns (event id, job id it joined or None), or (None, None)
        for a duplicate: an event whose key the project recorded within DUPLICATE_WINDOW_S."""
        now = time.time() if now is None else now
        seen = self._key("project", project, "seen", key) if key is not None else None
        if seen is not None and not self.redis.set(seen, 1, nx=True, ex=DUPLICATE_WINDOW_S):
            return None, None
        try:
            return self._record(project, trigger, annotations, policy, now, explicit)
        except BaseException:
            if seen is not None:  # not recorded: a retry of this delivery is not a duplicate
                with contextlib.suppress(Exception):
                    self.redis.delete(seen)
            raise

    def _record(self, project: str, trigger: str, annotations: int, policy: TriggerPolicy,
                now: float, explicit: bool) -> tuple[int, int | None]:
        with self._write():
            event_id = int(self.redis.incr(self._key("next_event")))
            self.redis.incr(self._key("project", project, "events"))
            queued = self._load(self.redis.get(self._key("project", project, "queued", TRAIN)))
            pending = int(self.redis.get(self._key("project", project, "pending")) or 0) + annotations
            not_before = next_start(policy, explicit, Job.from_row(queued) if queued else None, pending, now)
            if not_before is None:
                self.redis.set(self._key("project", project, "pending"), pending)
                return event_id, None
            if queued is None:
                job = self._new_job(project, TRAIN, trigger, now, not_before, explicit=explicit)
            else:
                job = queued
                job.update(not_before=not_before, trigger=trigger if explicit else queued["trigger"],
                           explicit=explicit or bool(queued.get("explicit")))
                self._save(job)
                self.redis.zadd(self._key("queued"), {str(job["id"]): not_before})
            self.redis.set(self._key("project", project, "pending"), 0)
            return event_id, job["id"]

    def enqueue(self, project: str, kind: str, trigger: str, now: float | None = None) -> tuple[int, bool]:
        """Queue a job of `kind` now unless one is queued for the project; returns (job id, whether new)."""
        now = time.time() if now is None else now
        with self._write():
            queued = self.redis.get(self._key("project", project, "queued", kind))
            if queued is not None:
                return int(queued), False
            return self._new_job(project, kind, trigger, now, now)["id"], True

    def first_wake(self, job_id: int, ttl_s: float) -> bool:
        """True once per job within `ttl_s`: whether a runner still has to be told about the job."""
        return bool(self.redis.set(self._key("woken", job_id), 1, nx=True, ex=max(1, int(ttl_s))))

    def set_progress(self, job_id: int, progress: dict) -> None:
        self.redis.set(self._key("progress", job_id), json.dumps(progress), ex=30 * 86400)

    def progress(self, job_id: int) -> dict | None:
        raw = self.redis.get(self._key("progress", job_id))
        return json.loads(raw) if raw else None

    def claim_due(self, pid: int, now: float | None = None, job_id: int | None = None,
                  worker: str | None = None) -> Job | None:
        """Mark the due queued job `job_id` (or the first due one) running for `worker` (default: host:pid);
        None if not."""
        now = time.time() if now is None else now
        with self._write():
            candidates = [self.job(job_id)] if job_id is not None else self.due_jobs(now)
            for candidate in candidates:
                if candidate is None or candidate.state != "queued" or candidate.not_before > now:
                    continue
                job = self._load(candidate.id)
                job.update(state="running", started_at=now, pid=pid, worker=worker or worker_name())
                pipe = self.redis.pipeline()
                pipe.set(self._key("job", job["id"]), json.dumps(job))
                pipe.zrem(self._key("queued"), str(job["id"]))
                pipe.sadd(self._key("running"), str(job["id"]))
                pipe.execute()
                key = self._key("project", job["project"], "queued", job["kind"])
                if self.redis.get(key) in (str(job["id"]).encode(), str(job["id"])):
                    self.redis.delete(key)
                return Job.from_row(job)
        return None

    def set_pid(self, job_id: int, pid: int) -> None:
        with self._write():
            job = self._load(job_id)
            if job is not None:
                job["pid"] = pid
                self._save(job)

    def finish(self, job_id: int, state: str, result: dict | None = None, error: str | None = None) -> None:
        """Record a running job's end; a job already ended (e.g. reaped) is left as it is."""
        assert state in ("succeeded", "failed")
        with self._write():
            self._finish(job_id, state, result, error)

    def _finish(self, job_id: int, state: str, result: dict | None, error: str | None) -> bool:
        job = self._load(job_id)
        if job is None or job["state"] != "running":
            return False
        job.update(state=state, finished_at=time.time(), result=result, error=error)
        self._save(job)
        self.redis.srem(self._key("running"), str(job_id))
        return True

    def recover(self, reason: str = "interrupted: the training process died", project: str | None = None) -> list[int]:
        """Fail the running jobs (of `project`). Only call while holding that project's lock."""
        ids = []
        with self._write():
            for job in self._running():
                if project is None or job.project == project:
                    if self._finish(job.id, "failed", None, reason):
                        ids.append(job.id)
        return ids

    def reap(self, lock_held: Callable[[str], bool], wake: Wake | None = None) -> list[int]:
        """Fail the running jobs whose project lock has expired (their worker died or was cut off) and queue
        one retry of each (joining a queued job of the project, if any); returns the failed job ids."""
        failed = []
        for job in self._running():
            if lock_held(job.project):
                continue
            retry = None
            with self._write():
                if self.job(job.id).state != "running" or lock_held(job.project):
                    continue
                self._finish(job.id, "failed", None, f"interrupted: worker {job.worker} stopped renewing project "
                             f"{job.project}'s lock (died or cut off)")
                failed.append(job.id)
                queued = self.redis.get(self._key("project", job.project, "queued", job.kind))
                if job.retry_of is None and queued is None:
                    now = time.time()
                    retry = self._new_job(job.project, job.kind, "RETRY", now, now, retry_of=job.id)["id"]
            log.warning("job reaped", extra={"job": job.id, "project": job.project, "worker": job.worker,
                                             "retry": retry})
            if retry is not None and wake is not None:
                wake(retry, 0.0)
        return failed

    # -- reading ------------------------------------------------------------------------------------
    def _running(self) -> list[Job]:
        jobs = [self.job(int(i)) for i in self.redis.smembers(self._key("running"))]
        return sorted((j for j in jobs if j is not None), key=lambda j: j.id)

    def job(self, job_id: int, db: object = None) -> Job | None:
        data = self._load(job_id)
        return Job.from_row(data) if data else None

    def jobs(self, project: str | None = None, limit: int = 100) -> list[Job]:
        key = self._key("project", project, "jobs") if project is not None else self._key("all")
        ids = self.redis.zrevrange(key, 0, limit - 1)
        return [j for j in (self.job(int(i)) for i in ids) if j is not None]

    def due_jobs(self, now: float | None = None) -> list[Job]:
        now = time.time() if now is None else now
        jobs = [self.job(int(i)) for i in self.redis.zrangebyscore(self._key("queued"), "-inf", now)]
        return sorted((j for j in jobs if j is not None and j.state == "queued"),
                      key=lambda j: (j.kind != TRAIN, j.not_before, j.id))

    def running_projects(self) -> list[str]:
        return sorted({j.project for j in self._running()})

    def running(self, project: str) -> list[Job]:
        return [j for j in self._running() if j.project == project]

    def count_events(self, project: str | None = None) -> int:
        if project is not None:
            return int(self.redis.get(self._key("project", project, "events")) or 0)
        return int(self.redis.get(self._key("next_event")) or 0)

    def pending_annotations(self, project: str) -> int:
        return int(self.redis.get(self._key("project", project, "pending")) or 0)

    status = JobStore.status  # the same summary, over this store's reads

    def workers(self) -> list[dict]:
        """Every running job across hosts: which worker runs what, since when, its progress."""
        return [{"job": j.id, "project": j.project, "kind": j.kind, "worker": j.worker, "since": j.started_at,
                 "progress": self.progress(j.id)} for j in self._running()]


class ProjectLock:
    """A project's Redis lock with expiry, renewed by a thread while held; `lost` is set when renewal fails."""

    def __init__(self, redis, project: str, ttl_s: float, prefix: str = PREFIX,
                 on_lost: Callable[[], None] | None = None) -> None:
        self.lock = redis.lock(f"{prefix}lock:{project}", timeout=ttl_s, thread_local=False)
        self.project = project
        self.ttl_s = ttl_s
        self.on_lost = on_lost
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, wait_s: float = 0.0) -> bool:
        if not self.lock.acquire(blocking=wait_s > 0, blocking_timeout=wait_s if wait_s > 0 else None):
            return False
        self._thread = threading.Thread(target=self._renew, name=f"lock-{self.project}", daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.lock.reacquire()
            except Exception as exc:  # LockNotOwnedError (expired, taken) or Redis unreachable
                log.error("project lock lost", extra={"project": self.project, "error": str(exc)})
                self.lost.set()
                if self.on_lost is not None:
                    self.on_lost()
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if not self.lost.is_set():
            with contextlib.suppress(Exception):
                self.lock.release()


def lock_held(redis, prefix: str = PREFIX) -> Callable[[str], bool]:
    return lambda project: bool(redis.exists(f"{prefix}lock:{project}"))


class RedisRunner:
    """Runs one job (the body of an RQ task): take the project's Redis lock, claim, run `job_command + [id]` as a
    child process while renewing the lock, record a crash. A busy project or a job not yet due is handed back
    to `wake` for later, so the worker moves on to other projects' jobs."""

    def __init__(self, store: RedisJobStore, job_command: list[str], wake: Wake, lock_ttl_s: float = 60.0,
                 busy_retry_s: float = 5.0, env: dict[str, str] | None = None, name: str | None = None) -> None:
        self.store = store
        self.job_command = job_command
        self.wake = wake
        self.lock_ttl_s = lock_ttl_s
        self.busy_retry_s = busy_retry_s
        self.env = env
        self.worker = f"{name}@{worker_name()}" if name else worker_name()  # e.g. the RQ worker's name@host:pid

    def reap(self) -> list[int]:
        return self.store.reap(lock_held(self.store.redis, self.store.prefix), self.wake)

    def run(self, job_id: int) -> str:
        """What happened: 'gone' (not queued any more), 'later' (not due, or its project busy), or the end state."""
        self.reap()
        job = self.store.job(job_id)
        if job is None or job.state != "queued":
            return "gone"
        if job.not_before > time.time():
            self.wake(job_id, job.not_before - time.time())
            return "later"
        child: list[subprocess.Popen] = []

        def lost() -> None:  # never two writers of a project: stop ours once its lock is gone
            for process in child:
                with contextlib.suppress(OSError):
                    process.send_signal(signal.SIGKILL)

        lock = ProjectLock(self.store.redis, job.project, self.lock_ttl_s, self.store.prefix, on_lost=lost)
        if not lock.acquire():
            self.wake(job_id, self.busy_retry_s)
            return "later"
        started = time.perf_counter()
        try:
            claimed = self.store.claim_due(os.getpid(), job_id=job_id, worker=self.worker)
            if claimed is None:
                return "gone"
            log.info("job started", extra={"job": job_id, "project": job.project, "kind": job.kind,
                                           "worker": self.worker})
            child.append(start_child(self.store, job_id, self.job_command, self.env))
            while True:
                try:
                    code = child[0].wait(timeout=max(1.0, self.lock_ttl_s / 3))
                    break
                except subprocess.TimeoutExpired:
                    self.reap()  # a busy worker also fails other projects' jobs whose worker died
            if lock.lost.is_set():
                self.store.finish(job_id, "failed", error="the project's lock expired while the job ran")
            else:
                record_exit(self.store, job_id, code)
        finally:
            lock.release()
        finished = self.store.job(job_id)
        log.info("job finished", extra={"job": job_id, "project": job.project, "state": finished.state,
                                        "seconds": round(time.perf_counter() - started, 1), "error": finished.error})
        return finished.state

