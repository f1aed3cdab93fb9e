"""A project of 150 new images through a real Label Studio 1.23 whose ML_TIMEOUT_PREDICT is lowered to 20 s
(the backend's PREDICT_DEADLINE_S to 15 s): select all -> Retrieve predictions, again, until every task has
masks, none lost; and images embedded as soon as they are imported into a connected project."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time

import pytest
import requests

from ml_backend.prelabel import BATCH
from tests.backend_server import REPO_ROOT, start_backend
from tests.label_studio import free_port, rect_result, start_label_studio
from tests.services import wait_for
from tests.test_scale import distinct_images

N_TASKS = 150
LS_TIMEOUT_S, DEADLINE_S = 20, 15


@pytest.fixture(scope="module")
def label_studio_20s(tmp_path_factory):
    with start_label_studio(tmp_path_factory.mktemp("ls-20s"), env={"ML_TIMEOUT_PREDICT": str(LS_TIMEOUT_S)}) as ls:
        yield ls


@pytest.fixture(scope="module")
def backend(label_studio_20s, tmp_path_factory):
    root = tmp_path_factory.mktemp("backend-scale")
    env = {"LABEL_STUDIO_URL": label_studio_20s.url, "LABEL_STUDIO_API_KEY": label_studio_20s.token,
           "MODEL_DIR": str(root / "models"), "WORKERS": "1", "THREADS": "4",
           "PREDICT_DEADLINE_S": str(DEADLINE_S)}
    with start_backend(env, root / "gunicorn.log") as url:
        yield url, root / "gunicorn.log"


def log_lines(log_path, event: str, **match) -> list[dict]:
    lines = []
    for line in log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == event and all(entry.get(k) == v for k, v in match.items()):
            lines.append(entry)
    return lines


def our_predictions(ls, project: int) -> dict[int, dict]:
    """task id -> its prediction from the backend (not the detector's)."""
    found = {}
    for task in ls.tasks(project):
        for prediction in task.get("predictions") or []:
            if "@" in str(prediction.get("model_version")):
                assert task["id"] not in found, f"task {task['id']} got two predictions"
                found[task["id"]] = prediction
    return found


def test_select_all_retrieve_predictions_until_every_task_has_masks(label_studio_20s, backend, tmp_path):
    ls, (url, log_path) = label_studio_20s, backend
    project = ls.create_project("scale 150", open_config())
    task_ids = ls.upload_many(project, distinct_images(tmp_path, N_TASKS))
    assert len(task_ids) == N_TASKS
    ls.import_predictions(project, [{"task": t, "model_version": "detector-v1", "score": 0.9,
                                     "result": [rect_result(20, 20, 40, 30, 100, 100, "nucleus")]}
                                    for t in task_ids])
    ls.connect_ml_backend(project, url, is_interactive=True)

    clicks, answered_total = 0, 0
    while True:
        clicks += 1
        started = time.monotonic()
        ls.retrieve_predictions(project)
        print(f"click {clicks}: {time.monotonic() - started:.1f} s")
        calls = log_lines(log_path, "request", path="/predict")
        assert calls[-1]["ms"] < LS_TIMEOUT_S * 1000, f"a call ran past Label Studio's limit: {calls[-1]}"
        answered_total = sum(c["answered"] for c in calls)
        stored = our_predictions(ls, project)
        assert len(stored) == answered_total, "a task the backend answered was not stored: work was lost"
        if len(stored) == N_TASKS or clicks >= 80:  # bounded; the assertion below bounds it by the encoder's pace
            break
    new_image_s = statistics.median(e["ms"] for e in log_lines(log_path, "task predicted", embedding_cached=False))
    bound = math.ceil(N_TASKS * new_image_s / 1000 / DEADLINE_S) + 2
    print(f"{N_TASKS} tasks in {clicks} clicks (bound {bound}: {new_image_s:.0f} ms a new image); "
          f"calls: {[(c['answered'], c['deferred'], round(c['ms'])) for c in calls]}")
    assert len(stored) == N_TASKS and clicks <= bound
    assert all(len(p["result"]) == 1 and p["result"][0]["type"] == "brushlabels" for p in stored.values())
    assert all(c["failed"] == 0 for c in calls)


def test_images_are_embedded_when_imported_into_a_connected_project(label_studio_20s, backend, tmp_path):
    ls, (url, log_path) = label_studio_20s, backend
    project = ls.create_project("prewarm on import", open_config())
    ml_id = ls.connect_ml_backend(project, url, is_interactive=True)
    paths = distinct_images(tmp_path, N_TASKS + 4)[N_TASKS:]  # images the other test did not use
    task_ids = ls.upload_many(project, paths)
    deadline = time.monotonic() + 120
    while not set(task_ids) <= {e["task"] for e in log_lines(log_path, "prewarm image", outcome="embedded")}:
        assert time.monotonic() < deadline, "imported images were not pre-warmed"
        time.sleep(1)
    seen = len(log_lines(log_path, "task predicted"))
    box = rect_result(20, 20, 40, 30, 100, 100, "nucleus")
    reply = ls.interactive(ml_id, task_ids[0], [box])
    assert reply["data"]["result"], reply
    (line,) = log_lines(log_path, "task predicted")[seen:]
    assert line["embedding_cached"] is True, line


def prelabel_project(ls, tmp_path, name: str, first_image: int) -> tuple[int, list[int]]:
    """A project of 4 new images with detector boxes, 1 without boxes and 1 whose image is missing; returns
    (project, [3 boxed tasks..., the one without boxes, the missing image's task])."""
    project = ls.create_project(name, open_config())
    images = distinct_images(tmp_path, first_image + 4)[first_image:]
    task_ids = ls.upload_many(project, images)
    missing = ls.post(f"/api/projects/{project}/import", params={"return_task_ids": "true"},
                      json=[{"data": {"image": f"/data/upload/{project}/missing.png"}}])["task_ids"]
    boxed = task_ids[:3] + missing
    ls.import_predictions(project, [{"task": t, "model_version": "detector-v1", "score": 0.9,
                                     "result": [rect_result(20, 20, 40, 30, 100, 100, "nucleus")]} for t in boxed])
    return project, task_ids + missing


def test_prelabel_command_predicts_every_boxed_task_once(label_studio_20s, tmp_path):
    ls = label_studio_20s
    project, tasks = prelabel_project(ls, tmp_path, "prelabel cli", N_TASKS + 4)
    env = {**os.environ, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token,
           "MODEL_DIR": str(tmp_path / "models"), "LOG_LEVEL": "WARNING"}

    def prelabel() -> dict:
        done = subprocess.run([sys.executable, "-m", "ml_backend", "prelabel", "--project", str(project), "--json"],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ls.token not in done.stderr + done.stdout
        return json.loads(done.stdout.strip().splitlines()[-1])

    job = prelabel()
    report = job["result"]
    assert job["state"] == "succeeded" and job["kind"] == "prelabel"
    assert (report["tasks"], report["predicted"], report["no_boxes"], report["failed"]) == (5, 3, 1, 1), report
    assert report["failures"][0]["task"] == tasks[4] and "missing.png" in report["failures"][0]["error"]
    stored = our_predictions(ls, project)
    assert sorted(stored) == sorted(tasks[:3])
    assert all(p["model_version"] == report["model_version"] and p["result"][0]["type"] == "brushlabels"
               for p in stored.values())
    again = prelabel()["result"]  # resumable: what has the version is skipped, nothing is posted twice
    assert (again["skipped"], again["predicted"], again["failed"]) == (3, 0, 1), again
    assert len(our_predictions(ls, project)) == 3


def test_prelabel_resumes_when_label_studio_restarts_mid_job(tmp_path):
    """Label Studio stops after the job posted its first batch and starts again: the job waits for it, then
    finishes where it was; every task gets exactly one prediction."""
    port, data, count = free_port(), tmp_path / "ls-data", 3 * BATCH
    first = start_label_studio(data, port=port)
    ls = first.__enter__()
    running = True
    try:
        project = ls.create_project("prelabel restart", open_config())
        task_ids = ls.upload_many(project, distinct_images(tmp_path, count))
        ls.import_predictions(project, [{"task": t, "model_version": "detector-v1", "score": 0.9,
                                         "result": [rect_result(20, 20, 40, 30, 100, 100, "nucleus")]}
                                        for t in task_ids])
        env = {**os.environ, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token,
               "MODEL_DIR": str(tmp_path / "models"), "LOG_LEVEL": "INFO"}
        job = subprocess.Popen([sys.executable, "-m", "ml_backend", "prelabel", "--project", str(project),
                                "--json"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        try:
            wait_for(lambda: len(our_predictions(ls, project)) >= BATCH, 300, "the job's first batch")
            first.__exit__(None, None, None)  # Label Studio goes away mid-job
            running = False
            assert job.poll() is None, "the job ended before Label Studio stopped"
            time.sleep(5)
            with start_label_studio(data, port=port) as again:
                out, err = job.communicate(timeout=600)
                assert job.returncode == 0, err[-3000:]
                report = json.loads(out.strip().splitlines()[-1])["result"]
                assert report["predicted"] == count and report["failed"] == 0, report
                assert sorted(our_predictions(again, project)) == sorted(task_ids)  # one each: none posted twice
            # the job met the outage: its API calls waited, or its image fetches failed and a later pass redid them
            assert "prelabel waits for Label Studio" in err or '"task image failed"' in err
        finally:
            job.kill()
    finally:
        if running:
            first.__exit__(None, None, None)


def test_prelabel_endpoint_runs_the_job_in_the_backends_runner(label_studio_20s, backend, tmp_path):
    ls, (url, log_path) = label_studio_20s, backend
    project, tasks = prelabel_project(ls, tmp_path, "prelabel http", N_TASKS + 8)
    ls.connect_ml_backend(project, url, is_interactive=True)
    response = requests.post(f"{url}/prelabel", json={"project": project}, timeout=10)
    assert response.status_code == 202, response.text
    job_id = response.json()["job"]

    def finished():
        status = requests.get(f"{url}/train/status", params={"project": project}, timeout=10).json()
        jobs = [j for j in status["prelabel"] if j["id"] == job_id and j["state"] in ("succeeded", "failed")]
        return jobs[0] if jobs else None

    job = wait_for(finished, 300, "the prelabel job", log_path=log_path)
    assert job["state"] == "succeeded", job
    assert job["progress"]["predicted"] == 3 and job["result"]["predicted"] == 3
    assert sorted(our_predictions(ls, project)) == sorted(tasks[:3])
    bad = requests.post(f"{url}/prelabel", json={"project": "twelve"}, timeout=10)
    assert bad.status_code == 400 and "project" in bad.json()["error"]


def open_config() -> str:
    return """<View><Image name="image" value="$image"/>
<RectangleLabels name="box" toName="image"><Label value="nucleus"/></RectangleLabels>
<BrushLabels name="mask" toName="image"><Label value="nucleus"/></BrushLabels></View>"""
