"""End to end: Label Studio webhooks -> training job -> promoted version -> better predictions, with the
scale-out runner (REDIS_URL: RQ queues the jobs, a real `rq worker` runs them; the embedded runner trains to a
new version in tests/test_e2e_auth.py, the compose worker in tests/test_compose_stack.py).

Also: kill -9 of the training process mid-run leaves a consistent state and the served version unharmed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import requests

from tests import dataset
from tests.backend_server import REPO_ROOT, start_backend
from tests.label_studio import brush_mask, gt_brush_results, rect_result
from tests.services import rq_worker, wait_for

TRAIN_IMAGES = dataset.splits()["train"][:10]
HELD_OUT = dataset.splits()["test"][:6]


def box_result(image_id: int) -> list[dict]:
    info = dataset.image_info(image_id)
    return [rect_result(*a["bbox"], info["width"], info["height"], "nucleus") for a in dataset.annotations(image_id)]


def held_out_miou(label_studio, task_ids: list[int], version_suffix: str) -> float:
    ious = []
    for task_id, image_id in zip(task_ids, HELD_OUT):
        predictions = [p for p in label_studio.predictions(task_id) if p["model_version"].endswith(version_suffix)]
        assert len(predictions) == 1, f"task {task_id}: {[p['model_version'] for p in label_studio.predictions(task_id)]}"
        assert len(predictions[0]["result"]) == len(dataset.annotations(image_id))  # one mask per box
        for region, annotation in zip(predictions[0]["result"], dataset.annotations(image_id)):
            ious.append(dataset.iou(brush_mask(region), dataset.gt_mask(annotation)))
    return float(np.mean(ious))


def training_process(status) -> Callable[[], int | None]:
    """The running job's pid once it is its training process (`worker --job ID`): a runner records its own pid
    when it claims the job, then the child's."""
    def pid() -> int | None:
        pid = (status()["running"] or {}).get("pid")
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if pid else []
        except OSError:
            return None
        return pid if b"--job" in command else None

    return pid


@pytest.fixture(scope="module")
def backend(label_studio, redis_url, tmp_path_factory):
    root = tmp_path_factory.mktemp("training-backend")
    env = {"REDIS_URL": redis_url, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
           "MODEL_DIR": str(root / "models"), "WORKERS": "2", "THREADS": "4", "MIN_ANNOTATIONS": str(len(TRAIN_IMAGES)),
           "TRAIN_DEBOUNCE_S": "2", "TRAIN_EPOCHS": "3", "TRAIN_OBJECTS_PER_IMAGE": "8",
           "PRELABEL_ON_PROMOTE": "true",
           # which images train and which gate follows the task ids (an id hash), so the session's earlier tests
           # move it: 2 epochs of 4 objects an image gained on some splits and lost 0.009 on another
           # (2026-12-07); 3 epochs of 8 gained +0.09 on the held-out tasks.
           # The operator's override: a job this small (a 4-5 image gate) may gain without showing it above the
           # gate's noise (small_projects.json); the evidence rule has its own tests
           # (test_evidence.py), this one follows the loop to a served version and checks it on held-out tasks
           "PROMOTION_MARGIN": "-1"}
    with rq_worker(redis_url, {**os.environ, **env}, root / "rq.log", REPO_ROOT):
        with start_backend(env, root / "gunicorn.log") as url:
            yield url, root / "models"


def test_webhooks_train_promote_and_serve_better_masks(label_studio, ls_project, backend):
    url, model_dir = backend
    train_ids = label_studio.upload_images(ls_project, [dataset.image_path(i) for i in TRAIN_IMAGES])
    held_ids = label_studio.upload_images(ls_project, [dataset.image_path(i) for i in HELD_OUT])
    for task_id, image_id in zip(train_ids, TRAIN_IMAGES):  # masks done before the backend was connected
        label_studio.create_annotation(task_id, gt_brush_results(image_id))
    ml_id = label_studio.connect_ml_backend(ls_project, url)
    status = lambda: requests.get(f"{url}/train/status", params={"project": ls_project}, timeout=5).json()

    for task_id, image_id in zip(held_ids, HELD_OUT):  # box-only: prompts, never training data
        label_studio.create_annotation(task_id, box_result(image_id))
    label_studio.retrieve_predictions(ls_project)
    base_miou = held_out_miou(label_studio, held_ids, "@base")
    score_column = subprocess.run(
        [sys.executable, "-m", "ml_backend", "connect", "--project", str(ls_project), "--url", url, "--score-column"],
        env={**os.environ, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token},
        capture_output=True, text=True, timeout=120)
    assert score_column.returncode == 0, score_column.stderr
    assert label_studio.get(f"/api/projects/{ls_project}")["model_version"].endswith("@base")
    assert status()["events_recorded"] == len(HELD_OUT) and status()["queued"] is None

    # "Start Training", then kill -9 the training process while it runs
    label_studio.start_training(ml_id)
    running = wait_for(training_process(status), 60, "a running job's training process")
    time.sleep(3)
    os.kill(running, signal.SIGKILL)
    failed = wait_for(lambda: status()["last"], 60, "the killed job to be recorded")
    assert failed["state"] == "failed" and "SIGKILL" in failed["error"]
    after_kill = status()
    assert after_kill["running"] is None and after_kill["active_version"] == "base"
    assert not [v for v in after_kill["versions"] if v["promoted"]]
    setup = requests.post(f"{url}/setup", json={"project": f"{ls_project}.1"}, timeout=5).json()
    assert setup["model_version"].endswith("@base")

    # corrected masks arrive as ANNOTATION_CREATED webhooks; MIN_ANNOTATIONS of them start a job
    for task_id, image_id in zip(train_ids, TRAIN_IMAGES):
        label_studio.create_annotation(task_id, gt_brush_results(image_id))
    done = wait_for(lambda: (lambda s: s["last"] if s["last"] and s["last"]["id"] != failed["id"] else None)(status()),
                    600, "the annotation-triggered job", interval=2)
    assert done["state"] == "succeeded", done
    result = done["result"]
    assert result["promoted"], json.dumps(result)
    version = result["version"]
    listed = label_studio.get(f"/api/ml/{ml_id}/versions")  # Label Studio's model-version list asks GET /versions
    assert "message" not in listed and f"{setup['model_version'].split('@')[0]}@{version}" in listed["versions"]
    for _ in range(6):  # every gunicorn worker serves the promoted version
        reported = requests.post(f"{url}/setup", json={"project": f"{ls_project}.1"}, timeout=5).json()
        assert reported["model_version"].endswith(f"@{version}")

    # PRELABEL_ON_PROMOTE: the promoted version pre-labels the project (the held-out tasks have boxes)
    prelabel = wait_for(lambda: next((j for j in status()["prelabel"] if j["state"] in ("succeeded", "failed")),
                                     None), 300, "the pre-labelling job after the promotion", interval=2)
    assert prelabel["state"] == "succeeded" and prelabel["trigger"] == "PROMOTED", prelabel
    assert prelabel["result"]["model_version"].endswith(f"@{version}")
    assert prelabel["result"]["predicted"] == len(HELD_OUT) and prelabel["result"]["failed"] == 0
    # the Data Manager's score column moved to the promoted version once its predictions were there
    assert label_studio.get(f"/api/projects/{ls_project}")["model_version"].endswith(f"@{version}")
    (promoted,) = [v for v in status()["versions"] if v["version"] == version]
    assert promoted["gate_miou_new"] > promoted["gate_miou_current"] and promoted["spearman_object"] is not None
    label_studio.retrieve_predictions(ls_project)  # nothing left to ask: every task has the version
    new_miou = held_out_miou(label_studio, held_ids, f"@{version}")
    print(f"held-out mIoU base {base_miou:.3f} -> {version} {new_miou:.3f}; job result {result}")
    assert new_miou > base_miou + 0.01
