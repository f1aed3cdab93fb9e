"""The job store's SQLite schema and its migrations, safe when many processes open a new store at once.

Every gunicorn worker, training worker and command-line run opens MODEL_DIR/jobs.sqlite when it starts; with
WORKERS=4, or the compose backend and worker containers starting together on one volume, several do so at the
same instant on a fresh directory. Two things then raced: switching a new file to WAL (SQLite answers "database
is locked" at once, without waiting in its busy handler) and the `kind` column's migration (the second process
failed with "duplicate column name"). So a store is brought up to date under an exclusive flock on a file beside
the database, and inside one `BEGIN IMMEDIATE` transaction that reads the schema version (`PRAGMA user_version`)
and applies only the steps it lacks; each step is idempotent too (a column is added only when missing), so a
file made by an older release (version 0, with or without `kind`) is migrated the same way. Opening a store that
is already current takes no lock: one read of `user_version`.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Callable

from .files import exclusive_lock

BASE_TABLES = (
    """CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, project TEXT NOT NULL, action TEXT NOT NULL,
        annotations INTEGER NOT NULL, received_at REAL NOT NULL, job_id INTEGER)""",
    """CREATE TABLE IF NOT EXISTS jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT, project TEXT NOT NULL, state TEXT NOT NULL,
        trigger TEXT NOT NULL, created_at REAL NOT NULL, not_before REAL NOT NULL,
        started_at REAL, finished_at REAL, pid INTEGER, result TEXT, error TEXT)""",
    "CREATE INDEX IF NOT EXISTS jobs_project_state ON jobs (project, state)",
    "CREATE TABLE IF NOT EXISTS job_progress (job_id INTEGER PRIMARY KEY, progress TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS events_project_job ON events (project, job_id)",
)


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _create_tables(db: sqlite3.Connection) -> None:
    for statement in BASE_TABLES:
        db.execute(statement)


def _add_job_kind(db: sqlite3.Connection) -> None:
    if "kind" not in _columns(db, "jobs"):  # a version-0 file may have it already (releases before versioning)
        db.execute("ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'train'")


def _add_event_keys(db: sqlite3.Connection) -> None:
    """Keys of recorded webhook events (JobStore.record_event): a delivery whose key is there is a duplicate."""
    db.execute("CREATE TABLE IF NOT EXISTS event_keys (project TEXT NOT NULL, key TEXT NOT NULL, "
               "received_at REAL NOT NULL, PRIMARY KEY (project, key))")
    db.execute("CREATE INDEX IF NOT EXISTS event_keys_received ON event_keys (received_at)")


def _add_job_explicit(db: sqlite3.Connection) -> None:
    """Whether a job was asked for explicitly ("train now": its start is never pushed back). Queued records of
    earlier releases knew it only by their trigger, Label Studio's action name: read once, here."""
    if "explicit" not in _columns(db, "jobs"):
        db.execute("ALTER TABLE jobs ADD COLUMN explicit INTEGER NOT NULL DEFAULT 0")
        db.execute("UPDATE jobs SET explicit=1 WHERE trigger='START_TRAINING'")


# Step i brings a file from version i to i + 1; append new steps, never change old ones.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_create_tables, _add_job_kind, _add_event_keys,
                                                                _add_job_explicit)
SCHEMA_VERSION = len(MIGRATIONS)


def lock_path(path: Path) -> Path:
    """The flock file beside the database: `jobs.sqlite` -> `jobs.sqlite.init.lock`."""
    return path.with_name(path.name + ".init.lock")


def schema_version(path: Path) -> int:
    """The file's `user_version` (0 for a new or empty file)."""
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


def ensure_schema(path: Path) -> int:
    """Create or migrate the store at `path` to SCHEMA_VERSION (WAL mode); returns the version it found.

    Safe to call from any number of processes at once: the first one does the work, the others wait on the
    flock and then find nothing left to do."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and schema_version(path) >= SCHEMA_VERSION:
        return SCHEMA_VERSION
    with exclusive_lock(lock_path(path)):
        db = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # persistent: every later connection of every process uses it
            db.execute("BEGIN IMMEDIATE")
            try:
                found = db.execute("PRAGMA user_version").fetchone()[0]
                for step in MIGRATIONS[found:]:
                    step(db)
                if found < SCHEMA_VERSION:
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return found
        finally:
            db.close()
