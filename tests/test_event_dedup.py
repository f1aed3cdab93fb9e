"""A webhook event delivered twice (two webhooks of one project to this backend) counts once: its key (the
annotations' ids and updated_at) is remembered by the job store, SQLite and Redis alike (a real redis-server)."""
from __future__ import annotations

import sqlite3
import uuid


from ml_backend.webhooks import parse_webhook
from trainer.jobs import DUPLICATE_WINDOW_S, JobStore, TriggerPolicy
from trainer.jobs_schema import MIGRATIONS
from trainer.jobs_redis import RedisJobStore

POLICY = TriggerPolicy(min_annotations=2, debounce_s=30)


def annotation_event(action: str, annotation_id: int, updated_at: str | None, project: int = 4) -> dict:
    annotation = {"id": annotation_id, "result": [], "was_cancelled": False}
    if updated_at is not None:
        annotation["updated_at"] = updated_at
    return {"action": action, "project": {"id": project}, "annotation": annotation, "task": {"id": 9}}


def test_the_key_is_the_annotation_state_whatever_webhook_delivers_it():
    first = parse_webhook(annotation_event("ANNOTATION_CREATED", 5, "2026-12-06T10:00:00.1Z"))
    assert first.key and first.annotations == 1
    assert parse_webhook(annotation_event("ANNOTATION_CREATED", 5, "2026-12-06T10:00:00.1Z")).key == first.key
    assert parse_webhook(annotation_event("ANNOTATION_UPDATED", 5, "2026-12-06T10:05:00.0Z")).key != first.key
    assert parse_webhook(annotation_event("ANNOTATION_CREATED", 6, "2026-12-06T10:00:00.1Z")).key != first.key
    assert parse_webhook(annotation_event("ANNOTATION_CREATED", 5, None)).key is None  # cannot tell: counts
    bulk = {"action": "ANNOTATIONS_CREATED", "project": {"id": 4},
            "annotation": [{"id": 2, "updated_at": "t2"}, {"id": 1, "updated_at": "t1"}]}
    swapped = {**bulk, "annotation": bulk["annotation"][::-1]}
    assert parse_webhook(bulk).key == parse_webhook(swapped).key and parse_webhook(bulk).annotations == 2
    deleted = parse_webhook({"action": "ANNOTATIONS_DELETED", "project": {"id": 4}, "annotations": [{"id": 1}]})
    assert deleted.key and deleted.key != parse_webhook(bulk).key
    assert parse_webhook({"action": "START_TRAINING", "project": {"id": 4}}).key is None


def check_counted_once(store) -> None:
    """The store's duplicate rule, at times 100, 101, ..."""
    event, job = store.record_event("1", "ANNOTATION_CREATED", 1, POLICY, now=100, key="k1")
    assert event is not None and job is None
    assert store.record_event("1", "ANNOTATION_CREATED", 1, POLICY, now=101, key="k1") == (None, None)
    assert store.pending_annotations("1") == 1 and store.count_events("1") == 1
    assert store.record_event("2", "ANNOTATION_CREATED", 1, POLICY, now=101, key="k1")[0] is not None  # per project
    _, job = store.record_event("1", "ANNOTATION_UPDATED", 1, POLICY, now=102, key="k2")
    assert job is not None  # two distinct annotations reach MIN_ANNOTATIONS=2, not one delivered twice
    assert store.record_event("1", "ANNOTATION_UPDATED", 1, POLICY, now=103, key="k2") == (None, None)
    for now in (104, 105):  # no key: every delivery counts
        assert store.record_event("1", "START_TRAINING", 0, POLICY, explicit=True, now=now)[0] is not None
    assert store.count_events("1") == 4


def test_sqlite_store_counts_a_key_once_within_the_window(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    check_counted_once(store)
    later = 103 + DUPLICATE_WINDOW_S + 1  # every key above is forgotten after the window (and pruned)
    assert store.record_event("1", "ANNOTATION_CREATED", 1, POLICY, now=later, key="k1")[0] is not None
    with sqlite3.connect(tmp_path / "jobs.sqlite") as db:
        assert db.execute("SELECT project, key FROM event_keys").fetchall() == [("1", "k1")]


def test_a_store_from_before_event_keys_is_migrated(tmp_path):
    path = tmp_path / "jobs.sqlite"
    JobStore(path)
    with sqlite3.connect(path) as db:  # as the previous schema version left it
        db.execute("DROP TABLE event_keys")
        before = [step.__name__ for step in MIGRATIONS].index("_add_event_keys")  # the version without the table
        db.execute(f"PRAGMA user_version = {before}")
    check_counted_once(JobStore(path))


def test_redis_store_counts_a_key_once(redis_url):
    from redis import Redis

    store = RedisJobStore(Redis.from_url(redis_url), prefix=f"test:{uuid.uuid4().hex[:8]}:")
    check_counted_once(store)
    ttl = store.redis.ttl(store._key("project", "1", "seen", "k1"))
    assert 0 < ttl <= DUPLICATE_WINDOW_S
