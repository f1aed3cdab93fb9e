"""Job store, coalescing, trigger policy, the cross-process lock and crash recovery."""
from __future__ import annotations

import multiprocessing
import sys

import pytest

from ml_backend.webhooks import parse_webhook
from ml_backend.protocol import ProtocolError
from trainer.jobs import Dispatcher, JobStore, TriggerPolicy, training_lock

POLICY = TriggerPolicy(min_annotations=3, debounce_s=10)


def test_annotation_events_wait_for_min_annotations_and_debounce(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    assert store.record_event("1", "ANNOTATION_CREATED", 1, POLICY, now=100)[1] is None
    assert store.record_event("1", "ANNOTATION_CREATED", 1, POLICY, now=101)[1] is None
    _, job_id = store.record_event("1", "ANNOTATION_CREATED", 1, POLICY, now=102)
    assert store.job(job_id).not_before == 112
    store.record_event("1", "ANNOTATION_UPDATED", 1, POLICY, now=105)  # pushes the start back
    assert store.job(job_id).not_before == 115
    assert store.claim_due(pid=1, now=114) is None
    assert store.claim_due(pid=1, now=115).id == job_id
    assert store.count_events("1") == 4 and store.pending_annotations("1") == 0


def test_start_training_is_immediate_and_not_delayed_by_edits(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    _, job_id = store.record_event("2", "START_TRAINING", 0, POLICY, now=100)
    store.record_event("2", "ANNOTATION_CREATED", 5, POLICY, now=101)
    job = store.job(job_id)
    assert job.not_before == 100 and job.trigger == "START_TRAINING"


def test_burst_while_running_makes_one_follow_up(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    _, first = store.record_event("3", "START_TRAINING", 0, POLICY, now=0)
    assert store.claim_due(pid=1, now=1).id == first
    joined = {store.record_event("3", "ANNOTATION_CREATED", 1, POLICY, now=2 + i)[1] for i in range(50)}
    jobs = store.jobs("3")
    assert len(jobs) == 2 and store.count_events("3") == 51
    assert joined - {None} == {max(j.id for j in jobs)}
    status = store.status("3")
    assert status["running"]["id"] == first and status["queued"]["id"] != first


def test_projects_are_independent(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    a = store.record_event("1", "START_TRAINING", 0, POLICY)[1]
    b = store.record_event("2", "START_TRAINING", 0, POLICY)[1]
    assert a != b


def _hold_lock(model_dir, ready, release):
    with training_lock(model_dir) as fd:
        assert fd is not None
        ready.set()
        release.wait(30)


def test_training_lock_is_cross_process(tmp_path):
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with training_lock(tmp_path) as fd:
            assert fd is None
    finally:
        release.set()
        holder.join(30)
    with training_lock(tmp_path) as fd:
        assert fd is not None


def test_dispatcher_runs_child_and_records_a_kill(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    # a child that kills itself with SIGKILL: the job must end failed, not stuck running
    suicide = [sys.executable, "-c", "import os, signal, sys; os.kill(os.getpid(), signal.SIGKILL)"]
    job_id = store.record_event("1", "START_TRAINING", 0, POLICY)[1]
    finished = Dispatcher(store, tmp_path, suicide).run_once()
    assert finished.id == job_id and finished.state == "failed" and "SIGKILL" in finished.error
    assert Dispatcher(store, tmp_path, suicide).run_once() is None  # nothing left to do


def test_recover_fails_jobs_left_running_by_a_dead_process(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = store.record_event("1", "START_TRAINING", 0, POLICY)[1]
    store.claim_due(pid=999999)
    ok = [sys.executable, "-c", "pass"]
    Dispatcher(store, tmp_path, ok).run_once()  # takes the lock, so the running job must be dead
    job = store.job(job_id)
    assert job.state == "failed" and "interrupted" in job.error


@pytest.mark.parametrize("body,expected", [
    ({"action": "ANNOTATION_CREATED", "project": {"id": 4}, "annotation": {"id": 1}}, ("4", 1)),
    ({"action": "ANNOTATION_UPDATED", "project": {"id": 4}, "annotation": {"was_cancelled": True}}, ("4", 0)),
    ({"action": "ANNOTATIONS_CREATED", "project": {"id": 4}, "annotation": [{"id": 1}, {"id": 2}]}, ("4", 2)),
    ({"action": "ANNOTATIONS_DELETED", "project": {"id": 4}, "annotations": [{"id": 1}]}, ("4", 1)),
    ({"action": "START_TRAINING", "project": {"id": 4, "title": "x"}}, ("4", 0)),
])
def test_parse_webhook(body, expected):
    event = parse_webhook(body)
    assert (event.project, event.annotations) == expected


def test_parse_webhook_ignores_and_refuses():
    assert parse_webhook({"action": "PROJECT_UPDATED", "project": {"id": 1}}) is None
    for bad in ({}, {"action": "START_TRAINING"}, {"action": "ANNOTATION_CREATED", "project": {"id": 1}},
                {"action": "START_TRAINING", "project": {"id": "../x"}}):
        with pytest.raises(ProtocolError):
            parse_webhook(bad)
