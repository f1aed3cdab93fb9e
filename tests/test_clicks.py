"""Clicks do what the annotator means (issue 26), through /predict with the real default model on an everyday photo,
and on a model that takes clicks (random weights) against segment-anything's own interactive loop.

The default LiteMedSAM learnt boxes only; before issue 26 a lone negative click gave the positive click's mask, a
negative click inside the mask changed nothing, two positive clicks gave a mask covering neither, a box plus a click
inside it shrank below the click, and `is_positive: 0` counted as positive.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from ml_backend.app import create_app
from ml_backend.backend import SamBackend
from ml_backend.settings import Settings
from tests.image_server import serve_files
from tests.label_studio import brush_mask, rect_result
from trainer.click_eval import interior_point
from trainer.clicks import ClickMemory, PromptEncoderClicks, covers, enforce
from trainer.data import load_coco
from trainer.models import LoadedModel, build_network
from trainer.quality import click_expected_iou, expected_iou
from trainer.runtime import Segmenter
from trainer.types import Embedding, Point, Prompts

from tests.dataset import ROOT
from tests.backend_server import shared_exports

EVERYDAY = ROOT.parent / "shared" / "datasets" / "coco_everyday"
TOKEN = "clicks-token"
CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="box" toName="image" smart="true"><Label value="thing"/><Label value="other"/></RectangleLabels>
<KeyPointLabels name="click" toName="image" smart="true"><Label value="thing"/><Label value="other"/></KeyPointLabels>
<BrushLabels name="mask" toName="image"><Label value="thing"/><Label value="other"/></BrushLabels></View>"""


@pytest.fixture(scope="module")
def photo():
    """The biggest object of an everyday test photo: (image samples, its sample)."""
    images = {im.image_id: im for im in load_coco(EVERYDAY).images if im.split == "test"}
    image = images["174632"]
    return image, max(image.samples, key=lambda s: s.area)


@pytest.fixture(scope="module")
def client(tmp_path_factory, photo):
    image, _ = photo
    path = next((EVERYDAY / "images").glob(f"*{int(image.image_id):012d}*"))
    with serve_files({"/data/upload/1/photo.jpg": path}, TOKEN) as url:
        settings = Settings(label_studio_url=url, label_studio_api_key=TOKEN,
                            model_dir=tmp_path_factory.mktemp("models"), prewarm=False, export_dir=shared_exports())
        yield create_app(settings, SamBackend(settings)).test_client()


def keypoint(point: Point, size: tuple[int, int], label: str = "thing", is_positive: object = None) -> dict:
    height, width = size
    region = {"type": "keypointlabels", "from_name": "click", "to_name": "image", "original_width": width,
              "original_height": height, "value": {"x": 100 * point.x / width, "y": 100 * point.y / height,
                                                   "width": 0.5, "keypointlabels": [label]}}
    if is_positive is not None:
        region["is_positive"] = is_positive
    return region


def ask(client, regions: list[dict]) -> list[dict]:
    """An interactive call with these regions drawn; the brush results."""
    body = {"tasks": [{"id": 1, "data": {"image": "/data/upload/1/photo.jpg"}}], "project": "1.1700000000",
            "label_config": CONFIG, "params": {"context": {"result": regions}}}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_json()
    (entry,) = response.get_json()["results"]
    return [r for r in entry["result"] if r["type"] == "brushlabels"]


def mask_of(results: list[dict], size: tuple[int, int]) -> np.ndarray:
    """The one mask an interactive call answers (an all-false frame when it answered none)."""
    assert len(results) <= 1
    return brush_mask(results[0]) if results else np.zeros(size, dtype=bool)


def at(mask: np.ndarray, point: Point) -> bool:
    return bool(mask[int(point.y), int(point.x)])


def test_a_lone_negative_click_masks_nothing_there(client, photo):
    _, sample = photo
    inside = Point(*interior_point(sample.mask)[:2])
    positive = mask_of(ask(client, [keypoint(inside, sample.image_size, is_positive=True)]), sample.image_size)
    negative = mask_of(ask(client, [keypoint(inside, sample.image_size, is_positive=False)]), sample.image_size)
    assert at(positive, inside) and not at(negative, inside)


def test_a_negative_click_inside_the_mask_removes_that_part(client, photo):
    _, sample = photo
    size = sample.image_size
    first = Point(*interior_point(sample.mask)[:2])
    before = mask_of(ask(client, [keypoint(first, size)]), size)
    yy, xx = np.mgrid[: size[0], : size[1]]
    far = before & ((xx - first.x) ** 2 + (yy - first.y) ** 2 > (0.25 * max(size)) ** 2)
    if not far.any():  # the first mask is small: any of its pixels away from the click
        far = before & ((xx - first.x) ** 2 + (yy - first.y) ** 2 > 100)
    spot = Point(*interior_point(far)[:2])
    after = mask_of(ask(client, [keypoint(first, size), keypoint(spot, size, is_positive=False)]), size)
    assert at(before, spot) and not at(after, spot) and at(after, first)
    assert 0 < after.sum() < before.sum()


def test_two_positive_clicks_give_one_mask_covering_both(client, photo):
    _, sample = photo
    size = sample.image_size
    first = Point(*interior_point(sample.mask)[:2])
    yy, xx = np.mgrid[: size[0], : size[1]]
    rest = sample.mask & ((xx - first.x) ** 2 + (yy - first.y) ** 2 > (0.3 * np.sqrt(sample.area)) ** 2)
    second = Point(*interior_point(rest)[:2])
    both = mask_of(ask(client, [keypoint(first, size), keypoint(second, size)]), size)
    assert at(both, first) and at(both, second)


def test_a_click_inside_a_box_adds_to_its_mask(client, photo):
    _, sample = photo
    size = sample.image_size
    b = sample.box
    box = rect_result(b.x0, b.y0, b.x1 - b.x0, b.y1 - b.y0, size[1], size[0], "thing")
    alone = mask_of(ask(client, [box]), size)
    missed = sample.mask & ~alone
    click = Point(*interior_point(missed if missed.any() else sample.mask)[:2])
    refined = mask_of(ask(client, [box, keypoint(click, size)]), size)
    assert at(refined, click)
    assert refined.sum() >= 0.95 * alone.sum()  # refines the box's mask, never collapses it (was 11,015 -> 3,020 px)


@pytest.mark.parametrize("positive, negative", [(1, 0), (True, False), ("true", "false")])
def test_is_positive_as_label_studio_and_its_sdk_send_it(client, photo, positive, negative):
    _, sample = photo
    size = sample.image_size
    inside = Point(*interior_point(sample.mask)[:2])
    assert at(mask_of(ask(client, [keypoint(inside, size, is_positive=positive)]), size), inside)
    assert not at(mask_of(ask(client, [keypoint(inside, size, is_positive=negative)]), size), inside)


def test_a_malformed_is_positive_is_refused(client, photo):
    _, sample = photo
    region = keypoint(Point(10, 10), sample.image_size, is_positive="maybe")
    body = {"tasks": [{"id": 1, "data": {"image": "/data/upload/1/photo.jpg"}}], "project": "1.1700000000",
            "label_config": CONFIG, "params": {"context": {"result": [region]}}}
    response = client.post("/predict", json=body)
    assert response.status_code == 400 and "is_positive" in response.get_json()["error"]


def test_the_mask_takes_the_label_drawn_last(client, photo):
    _, sample = photo
    size = sample.image_size
    first = Point(*interior_point(sample.mask)[:2])
    (result,) = ask(client, [keypoint(first, size, "thing"), keypoint(Point(first.x + 2, first.y), size, "other")])
    assert result["value"]["brushlabels"] == ["other"]


def test_remembered_steps_give_the_same_masks_as_a_replay(segmenter, photo):
    """The editor's session memory only saves work: each call's mask equals replaying every click from scratch."""
    image, sample = photo
    embedding = segmenter.embed(image.load_image())
    first = Point(*interior_point(sample.mask)[:2])
    clicks = (first, Point(first.x + 15, first.y + 10, False), Point(first.x - 20, first.y + 5))
    history = ClickMemory().scope("photo", "base")
    for k in range(1, len(clicks) + 1):
        remembered = segmenter.decode(embedding, Prompts(points=clicks[:k]), history=history)[0]
        replayed = segmenter.decode(embedding, Prompts(points=clicks[:k]))[0]
        assert np.array_equal(remembered.full(), replayed.full())
        assert all(covers(remembered, p) == p.positive for p in clicks[:k])


def test_click_only_masks_are_scored_by_their_own_signals(segmenter, photo):
    """A click-only mask's score weighs how well its own box reproduces it and how many clicks made it (issue 27);
    a box refined by a click keeps the box-style score."""
    image, sample = photo
    embedding = segmenter.embed(image.load_image())
    first = Point(*interior_point(sample.mask)[:2])
    clicks = (first, Point(first.x - 20, first.y + 5))
    for k in (1, 2):
        mask = segmenter.decode(embedding, Prompts(points=clicks[:k]))[0]
        assert 0 < mask.quality.agreement <= 1
        assert mask.score == pytest.approx(click_expected_iou(mask.quality, k))
    refined = segmenter.decode(embedding, Prompts(boxes=(sample.box,), points=clicks[:1]))[0]
    assert refined.quality.agreement == 1.0 and refined.score == pytest.approx(expected_iou(refined.quality))


def test_enforce_cuts_negative_clicks_and_keeps_positive_ones(photo):
    from trainer.types import Mask

    frame = np.zeros((50, 80), dtype=bool)
    frame[10:40, 10:70] = True
    mask = Mask(frame[10:40, 10:70].copy(), 10, 10, (50, 80), score=0.9)
    clicks = (Point(20, 25), Point(60, 25, False), Point(75, 45))
    edited = enforce(mask, clicks).full()
    assert edited[25, 20] and not edited[25, 60] and edited[45, 75]
    yy, xx = np.mgrid[:50, :80] + 0.5
    distance = [(xx - p.x) ** 2 + (yy - p.y) ** 2 for p in clicks]
    nearer_negative = distance[1] < np.minimum(distance[0], distance[2])
    assert np.array_equal(edited & frame, frame & ~nearer_negative)  # the mask loses exactly the negative's side
    assert 0 < (edited & ~frame).sum() <= np.pi * 3 ** 2  # the missed positive click gets a small disk


def test_a_negative_click_just_past_the_edge_still_clears_its_spot():
    """The editor's click lands a pixel or two from where the annotator aimed: a negative click just outside the mask
    takes the mask's pixels around it (within the enforce radius, nearer to it than to the positive click)."""
    from trainer.types import Mask

    frame = np.zeros((200, 300), dtype=bool)
    frame[50:150, 50:250] = True
    mask = Mask(frame[50:150, 50:250].copy(), 50, 50, (200, 300), score=0.9)
    clicks = (Point(100, 100), Point(251.5, 100, False))  # 1.5 px right of the mask's last column
    edited = enforce(mask, clicks).full()
    radius = max(2.0, 0.01 * 300)
    yy, xx = np.mgrid[:200, :300] + 0.5
    near = (xx - 251.5) ** 2 + (yy - 100) ** 2 <= radius ** 2
    assert not (edited & near).any() and (frame & near).any()
    assert np.array_equal(edited, frame & ~near)  # nothing else changes
    far = (Point(100, 100), Point(260, 100, False))  # farther than the radius: the mask is left alone
    assert np.array_equal(enforce(mask, far).full(), frame)


# -- models that take clicks: segment-anything's interactive loop, reproduced with the same random weights -------
@pytest.fixture(scope="module")
def clicky() -> Segmenter:
    """A MobileSAM-shaped network (SAM's prompt encoder and decoder, 1024 input) with random weights."""
    torch.manual_seed(0)
    sam, input_size, normalization = build_network("mobile_sam")
    sam.eval().requires_grad_(False)
    return Segmenter(LoadedModel(sam, "mobile_sam", "0" * 64, input_size, normalization))


def test_clicks_follow_segment_anythings_interactive_loop(clicky, photo):
    """Step 1: the best of the three multimask outputs; each next step: every click so far plus the previous
    step's low-res logits as the mask prompt -- as SamPredictor is driven in SAM's interactive evaluation."""
    from segment_anything.utils.transforms import ResizeLongestSide

    _, sample = photo
    torch.manual_seed(1)  # image features as an encoder would give them (the encoder is not under test here)
    size = clicky.model.input_size
    resized = ResizeLongestSide(size).get_preprocess_shape(*sample.image_size, size)
    embedding = Embedding(torch.randn(1, 256, 64, 64), sample.image_size, resized, size)
    predictor = SamPredictor(clicky.model.sam)
    predictor.features, predictor.original_size, predictor.input_size = embedding.features, sample.image_size, resized
    predictor.is_image_set = True
    first = Point(*interior_point(sample.mask)[:2])
    clicks = (first, Point(first.x + 25, first.y, False), Point(first.x - 30, first.y + 10))
    strategy = PromptEncoderClicks(clicky, embedding, clicky.model.sam.mask_decoder, None)
    step = strategy.start(None)
    previous = None
    for k in range(1, len(clicks) + 1):
        step = strategy.step(None, clicks[:k], step)
        coords = np.array([[p.x, p.y] for p in clicks[:k]])
        labels = np.array([1 if p.positive else 0 for p in clicks[:k]])
        logits, ious, low_res = predictor.predict(coords, labels, mask_input=previous, multimask_output=k == 1,
                                                  return_logits=True)
        best = int(np.argmax(ious)) if k == 1 else 0
        previous = low_res[best : best + 1]
        assert np.allclose(step.low_res[0].numpy(), previous, atol=1e-3)  # the model's own output, as SAM's
        # The full-resolution mask: SAM upsamples twice (to 1024, then to the image), we resample once, so only
        # pixels whose logit is near 0 may differ (random weights give logits of small magnitude: relative margin).
        decided = np.abs(logits[best]) > 0.05 * np.abs(logits[best]).max()
        disagree = (step.mask.full()[decided] != (logits[best][decided] > 0)).mean()
        assert disagree < 0.01, k
        assert decided.mean() > 0.75 and 0.01 < (logits[best] > 0).mean() < 0.99  # a real test: a mixed mask
