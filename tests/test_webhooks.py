"""POST /webhook under gunicorn (2 workers): durable, coalesced, fast; GET /train/status."""
from __future__ import annotations

import sqlite3
import time

import pytest
import requests

from tests.backend_server import start_backend


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    root = tmp_path_factory.mktemp("webhook-backend")
    # the runner is off: this file tests recording and coalescing, not training
    env = {"MODEL_DIR": str(root / "models"), "WORKERS": "2", "TRAINING_RUNNER": "off",
           "MIN_ANNOTATIONS": "5", "TRAIN_DEBOUNCE_S": "60"}
    with start_backend(env, root / "gunicorn.log") as url:
        yield url, root / "models"


def test_burst_of_50_events_all_recorded_in_at_most_two_jobs(backend):
    url, model_dir = backend
    session = requests.Session()
    answers = []
    for i in range(50):
        body = {"action": "ANNOTATION_CREATED", "project": {"id": 31}, "annotation": {"id": i}, "task": {"id": i}}
        started = time.perf_counter()
        response = session.post(f"{url}/webhook", json=body, timeout=5)
        answers.append(time.perf_counter() - started)
        assert response.status_code == 200 and response.json()["status"] == "recorded"
    assert max(answers) < 1.0, answers  # Label Studio gives a webhook 1 s; the benchmark reports p50/p99
    with sqlite3.connect(model_dir / "jobs.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM events WHERE project='31'").fetchone()[0] == 50
        assert db.execute("SELECT COUNT(*) FROM jobs WHERE project='31'").fetchone()[0] <= 2
    status = session.get(f"{url}/train/status", params={"project": 31}, timeout=5).json()
    assert status["events_recorded"] == 50 and status["queued"]["trigger"] == "ANNOTATION_CREATED"
    assert status["active_version"] == "base" and status["model_version"].endswith("@base")


def test_start_training_and_ignored_and_malformed(backend):
    url, _ = backend
    response = requests.post(f"{url}/webhook", json={"action": "START_TRAINING", "project": {"id": 32}}, timeout=5)
    assert response.status_code == 200 and response.json()["job"] is not None
    status = requests.get(f"{url}/train/status", params={"project": 32}, timeout=5).json()
    assert status["queued"]["trigger"] == "START_TRAINING"
    ignored = requests.post(f"{url}/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 32}}, timeout=5)
    assert ignored.status_code == 200 and ignored.json()["status"] == "ignored"
    for body in ({"project": {"id": 1}}, {"action": "ANNOTATION_CREATED"}, [1, 2]):
        bad = requests.post(f"{url}/webhook", json=body, timeout=5)
        assert bad.status_code == 400 and bad.json()["error"]
    bad = requests.post(f"{url}/webhook", data=b"{not json", headers={"Content-Type": "application/json"}, timeout=5)
    assert bad.status_code == 400
    assert requests.get(f"{url}/train/status", timeout=5).status_code == 400


def test_the_same_annotation_through_two_webhooks_counts_once(backend):
    """Two webhooks of a project to this backend (a connection made twice) deliver every event twice."""
    url, _ = backend
    body = {"action": "ANNOTATION_CREATED", "project": {"id": 33}, "task": {"id": 1},
            "annotation": {"id": 77, "updated_at": "2026-12-06T10:00:00.123456Z", "was_cancelled": False}}
    first = requests.post(f"{url}/webhook", json=body, timeout=5)
    second = requests.post(f"{url}/webhook", json=body, timeout=5)
    assert first.json()["status"] == "recorded" and second.json() == {"status": "duplicate"}, second.text
    edited = {**body, "action": "ANNOTATION_UPDATED",
              "annotation": {**body["annotation"], "updated_at": "2026-12-06T10:01:00.000001Z"}}
    assert requests.post(f"{url}/webhook", json=edited, timeout=5).json()["status"] == "recorded"
    status = requests.get(f"{url}/train/status", params={"project": 33}, timeout=5).json()
    assert status["events_recorded"] == 2 and status["pending_annotations"] == 2
