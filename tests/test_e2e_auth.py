"""Auth switched on, through a real Label Studio 1.23: `python -m ml_backend connect` sets Label Studio's "Use
basic auth" and the ML webhook's header, then Retrieve predictions, an interactive click, annotation webhooks ->
a training job -> a new version all pass the backend's basic auth; calls without it get 401 JSON; no
credential, right or wrong, appears in the backend's log."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests

from tests import dataset
from tests.backend_server import REPO_ROOT, start_backend
from tests.label_studio import gt_brush_results, rect_result
from tests.services import wait_for

USER, PASSWORD = "sam-backend", "correct-horse-battery"
WRONG = "wrong-password-123"
TRAIN_IMAGES = dataset.splits()["train"][:5]
HELD_OUT = dataset.splits()["test"][:2]


@pytest.fixture(scope="module")
def backend(label_studio, tmp_path_factory):
    root = tmp_path_factory.mktemp("auth-backend")
    env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
           "MODEL_DIR": str(root / "models"), "WORKERS": "1", "BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD,
           "MIN_ANNOTATIONS": str(len(TRAIN_IMAGES)), "TRAIN_DEBOUNCE_S": "1", "TRAIN_EPOCHS": "1",
           "TRAIN_OBJECTS_PER_IMAGE": "2"}
    with start_backend(env, root / "gunicorn.log") as url:
        yield url, root / "gunicorn.log", env


def connect(label_studio, project: int, url: str, env: dict) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "BACKEND_URL": url, "LOG_LEVEL": "WARNING"}
    return subprocess.run([sys.executable, "-m", "ml_backend", "connect", "--project", str(project)], cwd=REPO_ROOT,
                          env=full, capture_output=True, text=True, timeout=120)


def box_result(image_id: int) -> list[dict]:
    info = dataset.image_info(image_id)
    return [rect_result(*a["bbox"], info["width"], info["height"], "nucleus") for a in dataset.annotations(image_id)]


def test_label_studio_with_basic_auth_end_to_end(label_studio, ls_project, backend):
    url, log_path, env = backend
    auth = (USER, PASSWORD)
    for bad in (None, (USER, WRONG), ("someone", PASSWORD)):
        response = requests.get(f"{url}/train/status", params={"project": ls_project}, auth=bad, timeout=10)
        assert response.status_code == 401 and response.json()["error"], response.text
    assert requests.post(f"{url}/webhook", json={"action": "START_TRAINING", "project": {"id": ls_project}},
                         timeout=10).status_code == 401
    assert requests.get(f"{url}/health", timeout=10).status_code == 200

    train_ids = label_studio.upload_images(ls_project, [dataset.image_path(i) for i in TRAIN_IMAGES])
    held_ids = label_studio.upload_images(ls_project, [dataset.image_path(i) for i in HELD_OUT])
    done = connect(label_studio, ls_project, url, env)
    assert done.returncode == 0 and "connected" in done.stdout and "basic auth" in done.stdout, done.stderr
    (ml,) = label_studio.get("/api/ml", params={"project": ls_project})
    assert ml["auth_method"] == "BASIC_AUTH" and ml["basic_auth_user"] == USER and ml["basic_auth_pass_is_set"]
    hooks = [h for h in label_studio.get("/api/webhooks", params={"project": ls_project})
             if h["url"].rstrip("/") == f"{url}/webhook"]
    assert len(hooks) == 1 and hooks[0]["headers"]["Authorization"].startswith("Basic ")

    status = lambda: requests.get(f"{url}/train/status", params={"project": ls_project}, auth=auth, timeout=10).json()
    for task_id, image_id in zip(held_ids, HELD_OUT):  # box prompts; each arrives as an authenticated webhook
        label_studio.create_annotation(task_id, box_result(image_id))
    wait_for(lambda: status()["events_recorded"] == len(HELD_OUT), 30, "authenticated webhooks recorded")

    label_studio.retrieve_predictions(ls_project)
    for task_id, image_id in zip(held_ids, HELD_OUT):
        (prediction,) = label_studio.predictions(task_id)
        assert len(prediction["result"]) == len(dataset.annotations(image_id))
    annotation = dataset.annotations(HELD_OUT[0])[0]
    info = dataset.image_info(HELD_OUT[0])
    reply = label_studio.interactive(ml["id"], held_ids[0], [rect_result(*annotation["bbox"], info["width"],
                                                                         info["height"], "nucleus")])
    assert reply["data"]["result"], reply

    for task_id, image_id in zip(train_ids, TRAIN_IMAGES):  # masks: webhooks -> a training job
        label_studio.create_annotation(task_id, gt_brush_results(image_id))
    job = wait_for(lambda: (status()["last"] or {}).get("state") in ("succeeded", "failed") and status()["last"],
                   600, "the training job", interval=2)
    assert job["state"] == "succeeded", job
    assert job["result"]["version"] in [v["version"] for v in status()["versions"]]

    again = connect(label_studio, ls_project, url, env)
    assert again.returncode == 0 and "already connected" in again.stdout, again.stderr
    log = log_path.read_text()
    assert '"status": 401' in log and '"path": "/webhook"' in log
    for secret in (PASSWORD, WRONG, label_studio.token, hooks[0]["headers"]["Authorization"].split()[1]):
        assert secret not in log


def test_connect_refuses_a_bearer_only_backend(label_studio, ls_project, backend):
    url, _, env = backend
    bearer_only = {**{k: v for k, v in env.items() if not k.startswith("BASIC_AUTH")}, "AUTH_TOKEN": "t0ken",
                   "BASIC_AUTH_USER": "", "BASIC_AUTH_PASS": ""}
    done = connect(label_studio, ls_project, url, bearer_only)
    assert done.returncode == 2 and "BASIC_AUTH_USER" in done.stderr, done.stderr
