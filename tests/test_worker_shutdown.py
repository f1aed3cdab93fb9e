"""The training worker's stop (SIGTERM from `docker compose stop`/`down`): its running job's process is stopped
and the job goes back to the queue, due at once; a follow-up job queued meanwhile takes its place instead. A real
child process stands in for the training run (a sleep: the run's length is what matters). The worker process
itself, in its container, is stopped mid-job by tests/test_compose_stack.py."""
from __future__ import annotations

import sqlite3
import sys
import threading
import time

from tests.services import wait_for
from trainer.jobs import Dispatcher, JobStore, TriggerPolicy

POLICY = TriggerPolicy(min_annotations=1, debounce_s=0)
LONG_RUN = [sys.executable, "-c", "import time; time.sleep(120)", "--"]  # the dispatcher appends the job id


def _stop_while_running(store: JobStore, dispatcher: Dispatcher, project: str, during=lambda: None) -> float:
    """Run the dispatcher's loop, stop it once the project's job runs; returns the seconds the stop took."""
    loop = threading.Thread(target=dispatcher.loop, args=(0.1,), daemon=True)
    loop.start()
    wait_for(lambda: store.running(project) and store.running(project)[0].pid, 30, "the job's process")
    during()
    started = time.monotonic()
    dispatcher.stop()
    loop.join(30)
    assert not loop.is_alive(), "the loop did not end after stop()"
    return time.monotonic() - started


def test_stopped_job_goes_back_to_the_queue_due_at_once(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    _, job_id = store.record_event("1", "START_TRAINING", 0, POLICY, explicit=True)
    seconds = _stop_while_running(store, Dispatcher(store, tmp_path, LONG_RUN), "1")
    job = store.job(job_id)
    assert seconds < 5 and job.state == "queued" and job.pid is None and job.started_at is None, job
    assert [j.id for j in store.due_jobs()] == [job_id]  # the next worker runs it
    assert store.status("1")["recent_errors"] == []


def test_a_follow_up_queued_meanwhile_takes_the_stopped_jobs_place(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    _, first = store.record_event("1", "START_TRAINING", 0, POLICY, explicit=True)
    follow_up: list[int | None] = []
    policy = TriggerPolicy(min_annotations=1, debounce_s=3600)  # the follow-up would wait an hour on its own
    _stop_while_running(store, Dispatcher(store, tmp_path, LONG_RUN), "1",
                        during=lambda: follow_up.append(store.record_event("1", "ANNOTATION_CREATED", 2, policy)[1]))
    (second,) = follow_up
    assert second != first and store.job(first).state == "failed"
    assert f"job {second} takes its place" in store.job(first).error
    assert [j.id for j in store.due_jobs()] == [second]  # due at once, not after the debounce
    with sqlite3.connect(store.path) as db:  # both jobs' events now count for the follow-up
        assert db.execute("SELECT DISTINCT job_id FROM events").fetchall() == [(second,)]
