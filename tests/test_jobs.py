"""Job store, coalescing, trigger policy, the per-project locks and host slots, crash recovery."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ml_backend.webhooks import parse_webhook
from ml_backend.protocol import ProtocolError
from trainer.jobs import PRELABEL, Dispatcher, JobStore, TriggerPolicy, acquire_slot, project_lock

from tests.locks import LockHolder

POLICY = TriggerPolicy(min_annotations=3, debounce_s=10)


def check_min_annotations_and_debounce(store) -> int:
    """The trigger rules every job store keeps (SQLite here, Redis in test_rq_scale); returns the job's id."""
    assert store.record_event("1", "ANNOTATION_CREATED", 1, POLICY, now=100)[1] is None
    assert store.record_event("1", "ANNOTATION_CREATED", 1, POLICY, now=101)[1] is None
    _, job_id = store.record_event("1", "ANNOTATION_CREATED", 1, POLICY, now=102)
    assert store.job(job_id).not_before == 112
    store.record_event("1", "ANNOTATION_UPDATED", 1, POLICY, now=105)  # pushes the start back
    assert store.job(job_id).not_before == 115
    assert store.claim_due(pid=1, now=114) is None
    assert store.claim_due(pid=1, now=115).id == job_id
    return job_id


def test_annotation_events_wait_for_min_annotations_and_debounce(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    check_min_annotations_and_debounce(store)
    assert store.count_events("1") == 4 and store.pending_annotations("1") == 0


def test_start_training_is_immediate_and_not_delayed_by_edits(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    _, job_id = store.record_event("2", "START_TRAINING", 0, POLICY, explicit=True, now=100)
    store.record_event("2", "ANNOTATION_CREATED", 5, POLICY, now=101)
    job = store.job(job_id)
    assert job.not_before == 100 and job.trigger == "START_TRAINING"


def test_burst_while_running_makes_one_follow_up(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    _, first = store.record_event("3", "START_TRAINING", 0, POLICY, explicit=True, now=0)
    assert store.claim_due(pid=1, now=1).id == first
    joined = {store.record_event("3", "ANNOTATION_CREATED", 1, POLICY, now=2 + i)[1] for i in range(50)}
    jobs = store.jobs("3")
    assert len(jobs) == 2 and store.count_events("3") == 51
    assert joined - {None} == {max(j.id for j in jobs)}
    status = store.status("3")
    assert status["running"]["id"] == first and status["queued"]["id"] != first


def test_projects_are_independent(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    a = store.record_event("1", "START_TRAINING", 0, POLICY, explicit=True)[1]
    b = store.record_event("2", "START_TRAINING", 0, POLICY, explicit=True)[1]
    assert a != b


def test_project_lock_is_cross_process_and_per_project(tmp_path):
    with LockHolder(tmp_path, "a"):
        with project_lock(tmp_path, "a") as fd:
            assert fd is None
        with project_lock(tmp_path, "b") as fd:
            assert fd is not None  # another project is not blocked
        started = time.monotonic()
        with project_lock(tmp_path, "a", wait_s=0.6, poll_s=0.1) as fd:
            assert fd is None and time.monotonic() - started >= 0.6  # waited, bounded
    with project_lock(tmp_path, "a") as fd:
        assert fd is not None
    with project_lock(tmp_path, "../../etc/x") as fd:  # not a file name: hashed, stays under locks/
        assert fd is not None and all(p.parent == tmp_path / "locks" for p in tmp_path.rglob("*.lock"))


def test_slots_bound_jobs_at_once(tmp_path):
    first, second = acquire_slot(tmp_path, 2), acquire_slot(tmp_path, 2)
    try:
        assert first is not None and second is not None and acquire_slot(tmp_path, 2) is None
    finally:
        for fd in (first, second):
            os.close(fd)
    fd = acquire_slot(tmp_path, 2)
    assert fd is not None
    os.close(fd)


# A cheap stand-in for a job's child: records when it ran and marks the job succeeded, as run_one_job would.
FAKE_JOB = """
import json, sqlite3, sys, time
model_dir, seconds, job_id = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
start = time.time()
time.sleep(seconds)
db = sqlite3.connect(model_dir + "/jobs.sqlite", timeout=30, isolation_level=None)
project = db.execute("SELECT project FROM jobs WHERE id=?", (job_id,)).fetchone()[0]
open(f"{model_dir}/ran-{job_id}.json", "w").write(json.dumps([project, start, time.time()]))
db.execute("UPDATE jobs SET state='succeeded', finished_at=? WHERE id=?", (time.time(), job_id))
"""


def fake_job(model_dir: Path, seconds: float) -> list[str]:
    return [sys.executable, "-c", FAKE_JOB, str(model_dir), str(seconds)]


def intervals(model_dir: Path) -> list[tuple[str, float, float]]:
    return [tuple(json.loads(p.read_text())) for p in sorted(model_dir.glob("ran-*.json"))]


def most_at_once(spans: list[tuple[str, float, float]]) -> int:
    edges = sorted([(start, 1) for _, start, _ in spans] + [(end, -1) for _, _, end in spans])
    count = peak = 0
    for _, step in edges:
        count += step
        peak = max(peak, count)
    return peak


def overlap(x: tuple[str, float, float], y: tuple[str, float, float]) -> bool:
    return x[1] < y[2] and y[1] < x[2]


@pytest.mark.parametrize("concurrency", [1, 2])
def test_two_projects_run_concurrently_up_to_training_concurrency(tmp_path, concurrency):
    store = JobStore(tmp_path / "jobs.sqlite")
    ids = [store.record_event(p, "START_TRAINING", 0, POLICY, explicit=True)[1] for p in ("a", "b")]
    started = time.monotonic()
    assert Dispatcher(store, tmp_path, fake_job(tmp_path, 1.5), concurrency=concurrency).run_due() == 2
    wall = time.monotonic() - started
    assert [store.job(i).state for i in ids] == ["succeeded", "succeeded"]
    spans = intervals(tmp_path)
    assert sorted(s[0] for s in spans) == ["a", "b"]
    assert most_at_once(spans) == concurrency
    assert (wall < 2.9) if concurrency == 2 else (wall >= 3.0)


DISPATCH = """
import json, sys
from pathlib import Path
from trainer.jobs import Dispatcher, JobStore
model_dir = Path(sys.argv[1])
print(Dispatcher(JobStore(model_dir / "jobs.sqlite"), model_dir, json.loads(sys.argv[2]), concurrency=2).run_due())
"""


def test_one_project_never_twice_and_the_host_limit_holds_across_processes(tmp_path):
    """Two dispatcher processes (two gunicorn workers) with TRAINING_CONCURRENCY=2; project a has a training and
    a pre-labelling job, b and c one job each: a's jobs never overlap, never more than 2 at once, all run."""
    store = JobStore(tmp_path / "jobs.sqlite")
    ids = [store.record_event("a", "START_TRAINING", 0, POLICY, explicit=True)[1], store.enqueue("a", PRELABEL, "test")[0],
           store.record_event("b", "START_TRAINING", 0, POLICY, explicit=True)[1], store.record_event("c", "START_TRAINING", 0,
                                                                                    POLICY, explicit=True)[1]]
    command = json.dumps(fake_job(tmp_path, 1.0))
    repo = Path(__file__).resolve().parents[1]
    processes = [subprocess.Popen([sys.executable, "-c", DISPATCH, str(tmp_path), command], cwd=repo,
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
    ran = [int(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in processes]
    assert sum(ran) == 4 and [store.job(i).state for i in ids] == ["succeeded"] * 4
    spans = intervals(tmp_path)
    a_spans = [s for s in spans if s[0] == "a"]
    assert len(a_spans) == 2 and not overlap(*a_spans)
    assert most_at_once(spans) == 2


def test_training_is_claimed_before_prelabelling(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    prelabel = store.enqueue("a", PRELABEL, "test", now=1)[0]
    train = store.record_event("b", "START_TRAINING", 0, POLICY, explicit=True, now=2)[1]
    assert [j.id for j in store.due_jobs(now=3)] == [train, prelabel]


def test_a_busy_project_waits_and_recover_spares_its_running_job(tmp_path):
    """Project a's lock is held by a live process with a running job; b has a job left running by a dead
    process and a queued one: the dispatcher fails b's dead job only, runs b's queued job, leaves a's alone."""
    store = JobStore(tmp_path / "jobs.sqlite")
    with LockHolder(tmp_path, "a") as holder:
        a_running = store.record_event("a", "START_TRAINING", 0, POLICY, explicit=True)[1]
        assert store.claim_due(pid=holder.process.pid, job_id=a_running) is not None
        a_queued = store.record_event("a", "START_TRAINING", 0, POLICY, explicit=True)[1]
        b_dead = store.record_event("b", "START_TRAINING", 0, POLICY, explicit=True)[1]
        assert store.claim_due(pid=999999, job_id=b_dead) is not None
        b_queued = store.record_event("b", "START_TRAINING", 0, POLICY, explicit=True)[1]
        finished = Dispatcher(store, tmp_path, fake_job(tmp_path, 0)).run_once()
        assert finished.id == b_queued and finished.state == "succeeded"
        assert store.job(b_dead).state == "failed" and "interrupted" in store.job(b_dead).error
        assert store.job(a_running).state == "running" and store.job(a_queued).state == "queued"
        assert Dispatcher(store, tmp_path, fake_job(tmp_path, 0)).run_once() is None  # a stays busy
    finished = Dispatcher(store, tmp_path, fake_job(tmp_path, 0)).run_once()  # a's runner died with its lock
    assert finished.id == a_queued and finished.state == "succeeded"
    assert store.job(a_running).state == "failed"


def test_a_child_that_exits_without_recording_fails_its_job(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = store.record_event("1", "START_TRAINING", 0, POLICY, explicit=True)[1]
    finished = Dispatcher(store, tmp_path, [sys.executable, "-c", "pass"]).run_once()
    assert finished.id == job_id and finished.state == "failed" and "without recording" in finished.error


def test_dispatcher_runs_child_and_records_a_kill(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    # a child that kills itself with SIGKILL: the job must end failed, not stuck running
    suicide = [sys.executable, "-c", "import os, signal, sys; os.kill(os.getpid(), signal.SIGKILL)"]
    job_id = store.record_event("1", "START_TRAINING", 0, POLICY, explicit=True)[1]
    finished = Dispatcher(store, tmp_path, suicide).run_once()
    assert finished.id == job_id and finished.state == "failed" and "SIGKILL" in finished.error
    assert Dispatcher(store, tmp_path, suicide).run_once() is None  # nothing left to do


def test_recover_fails_jobs_left_running_by_a_dead_process(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = store.record_event("1", "START_TRAINING", 0, POLICY, explicit=True)[1]
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
