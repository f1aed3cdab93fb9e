"""Start-up and stop with many processes on one MODEL_DIR (issue 27, item 0).

- The job store: many processes open a new store at once (real processes, released together), again and again,
  and files made by older releases migrate.
- The backend: fresh starts of 4 gunicorn workers on a new MODEL_DIR, each healthy with every worker ready, then
  stopped while the pre-warm threads encode: exit 0, every worker stopped cleanly (no "terminate called without an
  active exception" / SIGABRT), every log line JSON. `benchmarks/startup.py` runs 20 such starts; STARTUP_ROUNDS
  sets how many this test runs (default 2, sized for the suite).
"""
from __future__ import annotations

import multiprocessing
import os
import sqlite3
import time
from pathlib import Path

import pytest

from tests.gunicorn_starts import fresh_start
from tests.store_race import open_store
from trainer.jobs import JobStore
from trainer.jobs_schema import SCHEMA_VERSION, schema_version

PROCESSES = 8
ROUNDS = 15


def test_many_processes_open_a_new_store_at_once(tmp_path: Path) -> None:
    # forkserver: a fork of the multi-threaded pytest process can hang on a lock another thread held at the fork
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.store_race"])  # each child starts in milliseconds
    failures: dict[str, int] = {}
    for round_ in range(ROUNDS):
        path = tmp_path / f"round-{round_}" / "jobs.sqlite"
        results, barrier = context.Queue(), context.Barrier(PROCESSES)
        processes = [context.Process(target=open_store, args=(str(path), barrier, results))
                     for _ in range(PROCESSES)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(60)
            assert process.exitcode == 0
        for _ in processes:
            outcome = results.get(timeout=5)
            if outcome != "ok":
                failures[outcome] = failures.get(outcome, 0) + 1
        assert schema_version(path) == SCHEMA_VERSION
        assert JobStore(path).count_events("1") == PROCESSES  # every process's event was committed
    assert failures == {}, f"{sum(failures.values())} of {ROUNDS * PROCESSES} opens failed: {failures}"


OLD_SCHEMA = """
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, project TEXT NOT NULL, action TEXT NOT NULL,
    annotations INTEGER NOT NULL, received_at REAL NOT NULL, job_id INTEGER);
CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, project TEXT NOT NULL, state TEXT NOT NULL,
    trigger TEXT NOT NULL, created_at REAL NOT NULL, not_before REAL NOT NULL,
    started_at REAL, finished_at REAL, pid INTEGER, result TEXT, error TEXT);
INSERT INTO jobs (project, state, trigger, created_at, not_before) VALUES ('7', 'succeeded', 'START_TRAINING', 1, 1);
"""


@pytest.mark.parametrize("with_kind", [False, True], ids=["before-kind", "kind-without-version"])
def test_store_files_of_earlier_releases_migrate(tmp_path: Path, with_kind: bool) -> None:
    """Version-0 files: the first release's (no `kind`) and the last unversioned one's (`kind` added by the old
    migration). Both open, keep their jobs, and end at the current version."""
    path = tmp_path / "jobs.sqlite"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA + ("ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'train';" if with_kind else ""))
    db.close()
    assert schema_version(path) == 0
    store = JobStore(path)
    assert schema_version(path) == SCHEMA_VERSION
    [job] = store.jobs("7")
    assert (job.kind, job.state) == ("train", "succeeded")
    journal = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert journal == "wal"


def test_an_up_to_date_store_opens_without_the_lock(tmp_path: Path) -> None:
    """Opening a current store takes no flock: a held init lock does not block it."""
    import fcntl

    path = tmp_path / "jobs.sqlite"
    JobStore(path)
    fd = os.open(tmp_path / "jobs.sqlite.init.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        started = time.monotonic()
        JobStore(path)
        assert time.monotonic() - started < 5
    finally:
        os.close(fd)


ROUNDS_OF_4_WORKERS = int(os.environ.get("STARTUP_ROUNDS", "2"))


@pytest.mark.parametrize("round_", range(ROUNDS_OF_4_WORKERS))
def test_fresh_start_of_4_workers_is_healthy_and_stops_cleanly(tmp_path: Path, round_: int) -> None:
    report = fresh_start(tmp_path, workers=4)
    tail = Path(report.log_path).read_text(errors="replace")[-3000:]
    assert report.healthy, f"never healthy:\n{tail}"
    assert report.ready_workers == 4, f"{report.ready_workers} of 4 workers loaded the model:\n{tail}"
    assert report.exit_code == 0, f"gunicorn exited with {report.exit_code}:\n{tail}"
    assert report.abort_lines == [], report.abort_lines
    assert report.non_json == [], report.non_json
    assert report.stopped_clean == 4, f"{report.stopped_clean} of 4 workers stopped cleanly:\n{tail}"
