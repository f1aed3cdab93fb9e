"""Property-based fuzzing of /setup, /predict and /webhook: never a 5xx, the server stays correct."""
from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings

from ml_backend.app import create_app
from ml_backend.backend import SamBackend
from ml_backend.settings import Settings
from tests import fuzzing
from tests.image_server import serve_files
from tests.label_studio import rect_result
from tests.backend_server import shared_exports

REACHED = {"masks": 0}  # fuzzed tasks whose prompts went through the encoder and the decoder to a mask
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    real = tmp_path_factory.mktemp("fuzz-images") / "real.png"
    real.write_bytes(base64.b64decode(fuzzing.LOADABLE_IMAGE.split(",", 1)[1]))
    with serve_files({fuzzing.LOADABLE_UPLOAD: real}, "fuzz-token") as url:
        config = Settings(model_dir=tmp_path_factory.mktemp("fuzz-models"), label_studio_url=url,
                          label_studio_api_key="fuzz-token", training_runner="off", image_timeout_s=1,
                          max_tasks=50, max_boxes=20, max_clicks=30, max_body_mb=2, export_dir=shared_exports())
        yield create_app(config, SamBackend(config)).test_client()


def _check(response) -> None:
    assert response.status_code < 500, response.get_data(as_text=True)[:500]
    assert response.is_json, response.get_data(as_text=True)[:200]


@settings(FUZZ, max_examples=200)  # most bodies are refused early: enough of them must load and reach a mask
@given(body=fuzzing.predict_bodies)
def test_predict_never_5xx(client, body):
    response = client.post("/predict", json=body)
    _check(response)
    if response.status_code == 200 and isinstance(body, dict) and isinstance(body.get("tasks"), list):
        assert len(response.get_json()["results"]) == len(body["tasks"])
        REACHED["masks"] += sum(1 for entry in response.get_json()["results"] if entry.get("result"))


@FUZZ
@given(body=fuzzing.setup_bodies)
def test_setup_never_5xx(client, body):
    _check(client.post("/setup", json=body))


@FUZZ
@given(body=fuzzing.webhook_bodies)
def test_webhook_never_5xx(client, body):
    _check(client.post("/webhook", json=body))


def test_still_correct_after_fuzzing(client):
    assert REACHED["masks"] > 0, "no fuzzed request reached the decoder"
    assert client.get("/health").get_json()["status"] == "UP"
    assert client.post("/setup", json={"project": "1.1"}).get_json()["model_version"].endswith("@base")


def _task(result: list[dict], url: str = fuzzing.LOADABLE_IMAGE) -> dict:
    return {"id": 1, "data": {"image": url}, "annotations": [{"id": 1, "result": result}]}


def _box(**value) -> dict:
    region = rect_result(10, 10, 30, 30, 100, 100, "cat")
    region["value"].update(value)
    return region


def _predict(client, tasks: list[dict], context: dict | None = None):
    response = client.post("/predict", json={"tasks": tasks, "label_config": fuzzing.CONFIG, "project": "1.1",
                                             "params": {"context": context}})
    _check(response)
    return response


@pytest.mark.parametrize("value", [
    {"x": float("nan")}, {"y": float("inf")}, {"width": -float("inf")}, {"height": "12"}, {"x": None},
    {"rotation": float("nan")}, {"rotation": "abc"}, {"rotation": [1]},  # a robustness-benchmark find: 500s
])
def test_non_finite_regions_on_a_loadable_image_fail_only_their_task(client, value):
    """JSON cannot carry NaN, but Python's json (and Label Studio's) writes it: the region reaches parsing."""
    tasks = [_task([_box(**value)]), _task([_box()], fuzzing.LOADABLE_UPLOAD)]
    results = _predict(client, tasks).get_json()["results"]
    assert "result" not in results[0] and "finite number" in results[0]["error"]
    assert len(results[1]["result"]) == 2  # brush + polygon of the good task


@pytest.mark.parametrize("value", [
    {"x": -50, "y": -50, "width": 80, "height": 80},       # partly outside: clipped
    {"x": -500, "y": -500, "width": 10, "height": 10},     # wholly outside: no box
    {"x": 10, "y": 10, "width": 1e300, "height": 1e300},   # huge
    {"x": 50, "y": 50, "width": 30, "height": 20, "rotation": 45},  # rotated: its bounding box
    {"x": 10, "y": 10, "width": 0, "height": 0},           # empty
    {"x": 10, "y": 10, "width": 30, "height": 30, "rectanglelabels": ["no such label"]},
    {"x": 10, "y": 10, "width": 30, "height": 30, "rectanglelabels": [{"nested": 1}]},
])
def test_hostile_boxes_on_a_loadable_image_reach_the_decoder_without_5xx(client, value):
    response = _predict(client, [_task([_box(**value)])])
    assert response.status_code == 200
    (entry,) = response.get_json()["results"]
    assert "result" in entry or "error" in entry
    for region in entry.get("result", []):
        assert region["value"].get("brushlabels", region["value"].get("polygonlabels")) == ["cat"]


def test_ten_thousand_clicks_get_a_clear_400(client):
    clicks = [{"type": "keypointlabels", "from_name": "click", "to_name": "image",
               "value": {"x": 1 + i % 90, "y": 1 + i // 120, "keypointlabels": ["cat"]}} for i in range(10_000)]
    response = _predict(client, [_task([])], context={"result": clicks})
    assert response.status_code == 400 and "MAX_CLICKS_PER_TASK" in response.get_json()["error"]
    ok = _predict(client, [_task([])], context={"result": clicks[:30]})
    assert ok.status_code == 200 and "result" in ok.get_json()["results"][0]


def test_request_limits(client):
    many = _predict(client, [_task([])] * 51)
    assert many.status_code == 400 and "MAX_TASKS_PER_REQUEST" in many.get_json()["error"]
    boxes = [_box(x=1 + 4 * i) for i in range(21)]
    results = _predict(client, [_task(boxes), _task(boxes[:20])]).get_json()["results"]
    assert "MAX_BOXES_PER_TASK" in results[0]["error"] and "result" in results[1]
    interactive = _predict(client, [_task([])], context={"result": boxes})  # only the last box is the prompt
    assert interactive.status_code == 200
    big = client.post("/predict", data=b"{" + b" " * (2 * 1024 * 1024 + 10) + b"}", content_type="application/json")
    assert big.status_code == 413 and big.is_json
