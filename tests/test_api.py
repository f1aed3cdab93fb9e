"""The HTTP service with the real model, as Label Studio calls it (images from a local stand-in host)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ml_backend.app import create_app
from ml_backend.backend import SamBackend
from ml_backend.settings import Settings
from tests import dataset
from tests.label_studio import brush_mask, rect_result
from tests.image_server import serve_files
from tests.backend_server import shared_exports

TOKEN = "test-token-123"
CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="box" toName="image"><Label value="nucleus"/></RectangleLabels>
<KeyPointLabels name="click" toName="image" smart="true"><Label value="nucleus"/></KeyPointLabels>
<BrushLabels name="mask" toName="image"><Label value="nucleus"/></BrushLabels></View>"""
IMAGE_IDS = (6, 13, 18)


@pytest.fixture(scope="module")
def rotated_jpeg(tmp_path_factory) -> tuple:
    """Image 18 stored rotated with EXIF orientation 6: viewers (and LS) show it upright again."""
    upright = Image.open(dataset.image_path(18)).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 = rotate 270 to display
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path_factory.mktemp("exif") / "rotated.jpg"
    stored.save(path, quality=97, exif=exif)
    return path


@pytest.fixture(scope="module")
def client(tmp_path_factory, rotated_jpeg):
    files = {f"/data/upload/1/{i:04d}.png": dataset.image_path(i) for i in IMAGE_IDS}
    files["/data/upload/1/rotated.jpg"] = rotated_jpeg
    with serve_files(files, TOKEN) as url:
        settings = Settings(label_studio_url=url, label_studio_api_key=TOKEN,
                            model_dir=tmp_path_factory.mktemp("models"), export_dir=shared_exports())
        app = create_app(settings, SamBackend(settings))
        yield app.test_client()


def box_region(annotation: dict, width: int, height: int) -> dict:
    return rect_result(*annotation["bbox"], width, height, "nucleus")


def task(image_id: int, n_boxes: int, task_id: int | None = None, url: str | None = None) -> dict:
    info = dataset.image_info(image_id)
    result = [box_region(a, info["width"], info["height"]) for a in dataset.annotations(image_id)[:n_boxes]]
    return {"id": task_id or image_id, "data": {"image": url or f"/data/upload/1/{image_id:04d}.png"},
            "annotations": [{"id": 1, "result": result}] if result else [], "predictions": []}



def predict(client, tasks, context=None):
    return client.post("/predict", json={"tasks": tasks, "project": "1.1700000000", "label_config": CONFIG,
                                         "params": {"login": None, "password": None, "context": context}})


def test_health_index_setup(client):
    assert client.get("/health").get_json()["status"] == "UP"
    version = client.post("/setup", json={"project": "1.1700000000", "schema": CONFIG,
                                          "hostname": "http://localhost:8080", "access_token": "x"}).get_json()
    assert version["model_version"].startswith("lite_medsam-") and version["model_version"].endswith("@base")
    assert client.get("/").get_json()["model_version"] == version["model_version"]


def test_versions_for_label_studios_model_version_list(client):
    body = client.get("/versions").get_json()
    assert body["versions"][0] == body["model_version"] and body["model_version"].endswith("@base")
    assert client.get("/versions?project=1").get_json()["versions"] == body["versions"]  # nothing trained yet


def test_batch_predict_one_result_per_task_in_order(client):
    tasks = [task(6, 9), task(13, 0, task_id=100), task(18, 5)]
    response = predict(client, tasks)
    assert response.status_code == 200, response.get_json()
    results = response.get_json()["results"]
    assert len(results) == 3
    # no box: no "result", so Label Studio stores nothing and asks again once boxes are drawn; not an error
    assert "result" not in results[1] and results[1]["no_boxes"] and "error" not in results[1]
    for image_id, entry, n in ((6, results[0], 9), (18, results[2], 5)):
        assert entry["model_version"].endswith("@base") and len(entry["result"]) == n
        ious = []
        for region, annotation in zip(entry["result"], dataset.annotations(image_id)):
            assert region["value"]["brushlabels"] == ["nucleus"] and 0 < region["score"] <= 1
            ious.append(dataset.iou(brush_mask(region), dataset.gt_mask(annotation)))
        assert np.mean(ious) > 0.6


def test_exif_rotated_image_masks_match_displayed_orientation(client):
    info = dataset.image_info(18)
    tasks = [task(18, 5, url="/data/upload/1/rotated.jpg")]
    (entry,) = predict(client, tasks).get_json()["results"]
    assert len(entry["result"]) == 5
    for region, annotation in zip(entry["result"], dataset.annotations(18)):
        assert (region["original_width"], region["original_height"]) == (info["width"], info["height"])
        assert dataset.iou(brush_mask(region), dataset.gt_mask(annotation)) > 0.5


def test_interactive_box_and_click(client):
    info = dataset.image_info(18)
    annotation = dataset.annotations(18)[0]
    x, y, w, h = annotation["bbox"]
    click = {"type": "keypointlabels", "from_name": "click", "to_name": "image",
             "value": {"x": 100 * (x + w / 2) / info["width"], "y": 100 * (y + h / 2) / info["height"],
                       "keypointlabels": ["nucleus"]}}
    for context in ({"result": [box_region(annotation, info["width"], info["height"])]}, {"result": [click]}):
        response = predict(client, [task(18, 0)], context)
        (entry,) = response.get_json()["results"]
        (region,) = entry["result"]
        assert dataset.iou(brush_mask(region), dataset.gt_mask(annotation)) > 0.6


def test_unreachable_image_fails_only_its_task(client):
    tasks = [task(6, 2), task(6, 2, task_id=7, url="/data/upload/1/missing.png"), {**task(6, 2), "data": {}},
             {"id": 9, "data": {}}]
    results = predict(client, tasks).get_json()["results"]
    assert len(results[0]["result"]) == 2
    assert "result" not in results[1] and "404" in results[1]["error"]
    assert "result" not in results[2] and "data.image" in results[2]["error"]
    assert "result" not in results[3] and results[3]["no_boxes"]  # no boxes: answered without its image


@pytest.mark.parametrize("body,message", [
    ({"tasks": "x", "label_config": CONFIG}, "tasks must be a list"),
    ({"tasks": [], "label_config": "<View/>"}, "no BrushLabels"),
    ({"tasks": [], "label_config": CONFIG, "params": {"context": 5}}, "context"),
    ({"tasks": [], "label_config": CONFIG, "project": "abc"}, "project"),
])
def test_bad_requests_get_clear_400(client, body, message):
    response = client.post("/predict", json=body)
    assert response.status_code == 400 and message in response.get_json()["error"]


def test_loadable_image_with_hostile_task_fields_gets_400_not_500(client):
    """The image loads, so the request reaches task parsing (a fuzz find: `annotations: true` was a 500)."""
    for hostile in ({"annotations": True}, {"predictions": 7}, {"annotations": [{"result": "x"}]}):
        response = predict(client, [{**task(6, 2), **hostile}])
        assert response.status_code == 400, response.get_json()
        assert "must be a list" in response.get_json()["error"]


def test_not_json_and_unknown_route(client):
    response = client.post("/predict", data="nope", content_type="text/plain")
    assert response.status_code == 400 and "JSON object" in response.get_json()["error"]
    assert client.get("/nope").status_code == 404 and "error" in client.get("/nope").get_json()


def test_bad_allowed_image_host_stops_the_backend_before_loading_the_model() -> None:
    with pytest.raises(SystemExit, match="ALLOWED_IMAGE_HOSTS"):
        SamBackend(Settings(allowed_image_hosts="http://images.example.com/path"))
