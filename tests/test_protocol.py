"""Label Studio JSON <-> typed objects: config parsing, coordinates, brush RLE and polygons."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from ml_backend import protocol
from ml_backend.protocol import ProtocolError
from trainer.types import Mask

CONFIG = """<View>
  <Image name="image" value="$img"/>
  <RectangleLabels name="box" toName="image"><Label value="cat"/><Label value="dog"/></RectangleLabels>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="cat"/></KeyPointLabels>
  <BrushLabels name="mask" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="cat"/></PolygonLabels>
</View>"""


def rect(x, y, w, h, label="cat", **extra):
    return {"type": "rectanglelabels", "from_name": "box", "to_name": "image",
            "value": {"x": x, "y": y, "width": w, "height": h, "rectanglelabels": [label], **extra}}


def test_parse_label_config():
    config = protocol.parse_label_config(CONFIG)
    assert config.image_name == "image" and config.image_key == "img"
    assert config.box_controls == ("box",) and config.point_controls == ("click",)
    assert [(o.kind, o.from_name) for o in config.outputs] == [("brushlabels", "mask"), ("polygonlabels", "poly")]
    assert config.outputs[1].label_for("dog") == "cat"  # the polygon control only knows "cat"
    assert config.outputs[0].label_for("dog") == "dog"


@pytest.mark.parametrize("xml,message", [
    ("<View><Image name='i' value='$i'/><RectangleLabels name='b' toName='i'/></View>", "no BrushLabels"),
    ("<View><Image", "not valid XML"),
    ("", "missing"),
])
def test_config_without_mask_control_is_refused(xml, message):
    with pytest.raises(ProtocolError, match=message):
        protocol.parse_label_config(xml)


def test_percent_box_to_pixels_and_rotation():
    box = protocol.region_to_box(rect(10, 20, 30, 40), width=200, height=100)
    assert (box.x0, box.y0, box.x1, box.y1, box.label) == (20, 20, 80, 60, "cat")
    rotated = protocol.region_to_box(rect(50, 10, 10, 10, rotation=90), width=100, height=100)
    assert (rotated.x0, rotated.y0, rotated.x1, rotated.y1) == pytest.approx((40, 10, 50, 20))
    clipped = protocol.region_to_box(rect(90, 90, 30, 30), width=100, height=100)
    assert (clipped.x1, clipped.y1) == (100, 100)
    with pytest.raises(ProtocolError, match="finite number"):
        protocol.region_to_box(rect("a", 0, 1, 1), 10, 10)


def test_task_boxes_prefer_latest_annotation_then_prediction():
    config = protocol.parse_label_config(CONFIG)
    task = {"annotations": [
                {"id": 1, "created_at": "2024-01-01", "result": [rect(0, 0, 10, 10)]},
                {"id": 2, "created_at": "2024-02-01", "result": [rect(0, 0, 50, 50, "dog"), rect(5, 5, 5, 5)]},
                {"id": 3, "created_at": "2024-03-01", "was_cancelled": True, "result": [rect(0, 0, 90, 90)]}],
            "predictions": [{"result": [rect(0, 0, 20, 20)]}]}
    boxes = protocol.task_boxes(task, config, 100, 100)
    assert [(b.x1, b.label) for b in boxes] == [(50, "dog"), (10, "cat")]
    assert [b.x1 for b in protocol.task_boxes({"annotations": [], "predictions": task["predictions"]},
                                              config, 100, 100)] == [20]
    assert protocol.task_boxes({"data": {}}, config, 100, 100) == []


@pytest.mark.parametrize("field", ["annotations", "predictions"])
@pytest.mark.parametrize("value", [True, 3, "x", {"result": []}])
def test_task_entries_that_are_not_lists_are_refused(field, value):
    config = protocol.parse_label_config(CONFIG)
    with pytest.raises(ProtocolError, match=f"{field} must be a list"):
        protocol.task_boxes({"id": 5, field: value}, config, 100, 100)


def test_context_prompts_missing_is_positive_means_positive():
    config = protocol.parse_label_config(CONFIG)
    click = {"type": "keypointlabels", "from_name": "click", "to_name": "image",
             "value": {"x": 50, "y": 25, "keypointlabels": ["cat"]}}
    negative = dict(click, is_positive=False)
    prompts = protocol.context_prompts({"result": [rect(0, 0, 10, 10), rect(10, 10, 80, 80), click, negative]},
                                       config, 200, 100)
    assert [(b.x0, b.x1) for b in prompts.boxes] == [(20, 180)]
    assert [(p.x, p.y, p.positive) for p in prompts.points] == [(100, 25, True), (100, 25, False)]
    with pytest.raises(ProtocolError):
        protocol.context_prompts({"result": []}, config, 10, 10)


def _disk_mask(height=60, width=80) -> Mask:
    yy, xx = np.mgrid[:30, :40]
    crop = (yy - 15) ** 2 + (xx - 20) ** 2 < 12 ** 2
    return Mask(crop=crop, x0=25, y0=10, image_size=(height, width), score=0.9, label="cat")


def test_brush_rle_round_trip_is_0_255():
    mask = _disk_mask()
    config = protocol.parse_label_config(CONFIG)
    brush, polygon = protocol.mask_to_regions(mask, config)
    assert brush["type"] == "brushlabels" and brush["value"]["brushlabels"] == ["cat"]
    assert (brush["original_width"], brush["original_height"]) == (80, 60)
    decoded = decode_rle(brush["value"]["rle"]).reshape(60, 80, 4)[:, :, 3]
    assert set(np.unique(decoded)) == {0, 255}
    assert np.array_equal(decoded == 255, mask.full())


def test_polygon_is_valid_and_close_to_mask():
    import cv2

    mask = _disk_mask()
    config = protocol.parse_label_config(CONFIG)
    _, polygon = protocol.mask_to_regions(mask, config)
    points = polygon["value"]["points"]
    assert len(points) >= 3 and all(0 <= x <= 100 and 0 <= y <= 100 for x, y in points)
    pixels = np.array([[x * 80 / 100, y * 60 / 100] for x, y in points], dtype=np.int32)
    raster = np.zeros((60, 80), np.uint8)
    cv2.fillPoly(raster, [pixels], 1)
    full = mask.full()
    assert (np.logical_and(raster, full).sum() / np.logical_or(raster, full).sum()) > 0.85
    assert len(points) < 40  # simplified


def test_prediction_entry_and_empty_task():
    config = protocol.parse_label_config(CONFIG)
    entry = protocol.prediction([_disk_mask()], config, "m@base")
    assert entry["model_version"] == "m@base" and entry["score"] == pytest.approx(0.9)
    assert len(entry["result"]) == 2
    two = protocol.prediction([_disk_mask(), _disk_mask()], config, "m@base")["result"]
    ids = [region["id"] for region in two]
    assert len(set(ids)) == len(ids) == 4  # the editor merges results sharing an id into one region
    assert protocol.prediction([], config, "m@base") == {"result": [], "score": 0.0, "model_version": "m@base"}


def test_scores_are_in_0_1_and_an_empty_mask_counts_as_a_failure():
    config = protocol.parse_label_config(CONFIG)
    over = dataclasses.replace(_disk_mask(), score=1.3)  # SAM's predicted IoU can pass 1
    entry = protocol.prediction([over], config, "m@base")
    assert entry["score"] == 1.0 and all(region["score"] == 1.0 for region in entry["result"])
    empty = dataclasses.replace(_disk_mask(), crop=np.zeros_like(_disk_mask().crop))
    entry = protocol.prediction([_disk_mask(), empty], config, "m@base")
    assert entry["score"] == pytest.approx(0.45) and len(entry["result"]) == 2  # the empty mask has no region


def test_project_id_forms():
    assert protocol.project_id("12.1700000000") == "12"
    assert protocol.project_id({"id": 7, "title": "x"}) == "7"
    assert protocol.project_id(None) is None
    with pytest.raises(ProtocolError):
        protocol.project_id("../etc")
