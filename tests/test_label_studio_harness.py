"""Smoke test of the real-Label-Studio harness (tests/label_studio.py)."""

import threading
from typing import Any, Iterator

import pytest
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

from tests.dataset import DATASET
from tests.label_studio import SAM_LABEL_CONFIG, LabelStudioServer, free_port, rect_result

IMAGES = DATASET / "images"


def test_project_upload_annotate_roundtrip(label_studio: LabelStudioServer) -> None:
    assert "<BrushLabels" in SAM_LABEL_CONFIG and '<Image name="image" value="$image"/>' in SAM_LABEL_CONFIG
    pid = label_studio.create_project("harness smoke", SAM_LABEL_CONFIG)
    paths = [IMAGES / "0001.png", IMAGES / "0002.png"]
    task_ids = label_studio.upload_images(pid, paths)
    assert len(task_ids) == 2

    tasks = {t["id"]: t for t in label_studio.tasks(pid)}
    assert set(tasks) == set(task_ids)
    for tid, path in zip(task_ids, paths):  # ids come back in upload order
        url = tasks[tid]["data"]["image"]
        assert url.startswith(f"/data/upload/{pid}/") and url.endswith("-" + path.name)

    box = rect_result(10, 20, 30, 40, 256, 256, "nucleus", "box", "image")
    assert box["value"]["x"] == 100 * 10 / 256 and box["value"]["height"] == 100 * 40 / 256
    aid = label_studio.create_annotation(task_ids[0], [box])

    annotated = {t["id"]: t for t in label_studio.tasks(pid)}[task_ids[0]]
    assert [a["id"] for a in annotated["annotations"]] == [aid]
    exported = label_studio.export(pid)  # annotated tasks only, by default
    assert [t["id"] for t in exported] == [task_ids[0]]
    assert exported[0]["annotations"][0]["result"][0]["value"] == box["value"]
    everything = {t["id"]: t for t in label_studio.export(pid, all_tasks=True)}
    assert set(everything) == set(task_ids) and everything[task_ids[1]]["annotations"] == []

    # the uploaded image is served to token holders (what the backend will fetch)
    r = label_studio.session.get(label_studio.url + annotated["data"]["image"], timeout=30)
    assert r.status_code == 200 and r.content == paths[0].read_bytes()


@pytest.fixture
def stub_backend() -> Iterator[tuple[str, list[tuple[str, Any]]]]:
    """A minimal ML backend on 127.0.0.1 answering one box per task; yields (url, calls)."""
    calls: list[tuple[str, Any]] = []
    app = Flask("stub-backend")

    @app.get("/health")
    def health() -> Any:
        return jsonify(status="UP", model_class="Stub")

    @app.post("/setup")
    def setup() -> Any:
        calls.append(("setup", request.json))
        return jsonify(model_version="stub-1")

    @app.post("/predict")
    def predict() -> Any:
        body = request.json
        calls.append(("predict", body))
        box = rect_result(1, 2, 3, 4, 256, 256, "nucleus")
        return jsonify(results=[{"result": [box], "score": 0.5, "model_version": "stub-1"}
                                for _ in body["tasks"]])

    @app.post("/webhook")
    def webhook() -> Any:
        calls.append(("webhook", request.json))
        return jsonify(status="ok")

    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", calls
    server.shutdown()
    thread.join(5)


def test_ml_backend_helpers(label_studio: LabelStudioServer, ls_project: int,
                            stub_backend: tuple[str, list[tuple[str, Any]]]) -> None:
    url, calls = stub_backend
    (task_id,) = label_studio.upload_images(ls_project, [IMAGES / "0003.png"])
    ml_id = label_studio.connect_ml_backend(ls_project, url)
    setup = next(body for kind, body in calls if kind == "setup")
    assert setup["project"].startswith(f"{ls_project}.") and setup["access_token"] == label_studio.token

    label_studio.retrieve_predictions(ls_project)
    (pred,) = label_studio.predictions(task_id)
    assert pred["model_version"] == "stub-1" and pred["result"][0]["type"] == "rectanglelabels"

    prompt = [rect_result(10, 10, 50, 50, 256, 256, "nucleus")]
    assert label_studio.interactive(ml_id, task_id, prompt)["data"]["score"] == 0.5
    assert calls[-1][1]["params"]["context"] == {"result": prompt}

    label_studio.start_training(ml_id)
    assert ("START_TRAINING", ls_project) in [
        (b.get("action"), b.get("project", {}).get("id")) for k, b in calls if k == "webhook"]
