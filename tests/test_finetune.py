"""Decoder fine-tuning and training data, on real LiteMedSAM weights and the dsb2018 nuclei subset."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ml_backend.annotations import load_data, load_label_studio_export
from ml_backend.fetch import ImageSource
from tests.dataset import DATASET
from trainer.cache import DiskEmbeddings, image_key
from trainer.data import DataError, Dataset, ImageSamples, assign_splits, load_coco, read_image
from trainer.decoder import decode_windows, decoder_copy, prepare_image
from trainer.finetune import (FineTuneConfig, TrainingEmbeddings, evaluate, fine_tune, input_boxes, jitter,
                              low_res_target, make_loss, sample_loss, window_forward)
from trainer.losses import WindowDiceLoss
from trainer.runtime import Segmenter
from trainer.types import Box



@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return load_coco(DATASET)


@pytest.fixture(scope="module")
def embeddings(segmenter: Segmenter, tmp_path_factory: pytest.TempPathFactory) -> TrainingEmbeddings:
    return TrainingEmbeddings(segmenter, DiskEmbeddings(tmp_path_factory.mktemp("model-dir") / "embeddings"))


def by_id(dataset: Dataset, *ids: int) -> list[ImageSamples]:
    index = {image.image_id: image for image in dataset.images}
    return [index[str(i)] for i in ids]


# -- data -------------------------------------------------------------------------------------------------
def test_coco_counts_and_splits(dataset: Dataset) -> None:
    assert dataset.summary["images"] == 102 and dataset.summary["objects"] == 3327
    assert {k: v["images"] for k, v in dataset.summary["splits"].items()} == {"train": 61, "val": 20, "test": 21}
    sample = dataset.images[0].samples[0]
    assert sample.label == "nucleus" and sample.mask.shape == sample.image_size and sample.mask.dtype == bool
    ys, xs = np.nonzero(sample.mask)
    assert (sample.box.x0, sample.box.y0, sample.box.x1, sample.box.y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert dataset.images[0].load_image().shape == (*sample.image_size, 3)


def test_coco_polygons_and_hash_split(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    images, annotations = [], []
    for i in range(10):
        cv2.imwrite(str(tmp_path / "images" / f"{i}.png"), np.full((40, 50, 3), 90, np.uint8))
        images.append({"id": i, "file_name": f"{i}.png", "width": 50, "height": 40})
        annotations.append({"id": i, "image_id": i, "category_id": 7, "iscrowd": 0,
                            "segmentation": [[10, 5, 30, 5, 30, 25, 10, 25]]})
    (tmp_path / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": [{"id": 7, "name": "square"}]}))
    data = load_coco(tmp_path)
    sample = data.images[0].samples[0]
    assert sample.label == "square" and 380 <= sample.area <= 460
    assert data.images[0].load_image().shape == (40, 50, 3)
    splits = [image.split for image in data.images]
    assert set(splits) == {"train", "val"} and splits == [image.split for image in load_coco(tmp_path).images]


def test_hash_split_is_about_a_fifth() -> None:
    images = [ImageSamples(str(i), lambda: None, [None]) for i in range(1000)]  # one object each
    assign_splits(images)
    assert 150 < sum(i.split == "val" for i in images) < 250
    two = [ImageSamples("a", lambda: None, []), ImageSamples("b", lambda: None, [])]
    assign_splits(two)
    assert sorted(i.split for i in two) == ["train", "val"]


def _percent_rect(box: tuple[float, float, float, float], width: int, height: int) -> dict:
    x0, y0, x1, y1 = box
    return {"x": 100 * x0 / width, "y": 100 * y0 / height, "width": 100 * (x1 - x0) / width,
            "height": 100 * (y1 - y0) / height, "rotation": 0, "rectanglelabels": ["nucleus"]}


def make_ls_export(dataset: Dataset, image_id: int = 45) -> tuple[list[dict], list[np.ndarray]]:
    """Tasks as Label Studio exports them: brush + rectangle pairs, a polygon, cancelled/empty/box-only ones."""
    from tests.label_studio import brush_result

    (image,) = by_id(dataset, image_id)
    height, width = image.samples[0].image_size
    masks = [s.mask for s in image.samples[:4]]
    common = {"original_width": width, "original_height": height, "image_rotation": 0, "to_name": "image"}

    def brush(region_id: str, mask: np.ndarray) -> dict:
        return brush_result(mask, "nucleus", region_id)

    def rect(region_id: str, box: tuple[float, float, float, float]) -> dict:
        return {**common, "id": region_id, "from_name": "box", "type": "rectanglelabels",
                "value": _percent_rect(box, width, height)}

    contour = max(cv2.findContours(masks[3].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[0],
                  key=cv2.contourArea)[:, 0, :]
    polygon = {**common, "id": "p1", "from_name": "poly", "type": "polygonlabels",
               "value": {"points": [[100 * x / width, 100 * y / height] for x, y in contour],  # pixel indices, as serving writes
                         "polygonlabels": ["nucleus"]}}
    box_a = (image.samples[0].box.x0 - 3, image.samples[0].box.y0 - 2, image.samples[0].box.x1 + 2,
             image.samples[0].box.y1 + 3)
    b = image.samples[1].box
    result = [brush("a", masks[0]), rect("a", box_a), brush("b", masks[1]), rect("other", (b.x0, b.y0, b.x1 + 1, b.y1)),
              brush("c", masks[2]), polygon, rect("far", (0, 0, 3, 3))]
    url = f"/data/upload/1/0a1b2c3d-{image_id:04d}.png"
    tasks = [
        {"id": 1, "data": {"image": url}, "annotations": [
            {"id": 10, "was_cancelled": True, "result": [brush("x", masks[0])], "updated_at": "2025-01-02"},
            {"id": 11, "was_cancelled": False, "result": result, "updated_at": "2025-01-01"}]},
        {"id": 2, "data": {"image": url}, "annotations": [
            {"id": 20, "was_cancelled": False, "result": [rect("r", box_a)]},
            {"id": 21, "was_cancelled": False, "result": []}]},
    ]
    return tasks, masks


def test_label_studio_export_parsing(dataset: Dataset) -> None:
    tasks, masks = make_ls_export(dataset)
    calls = []

    def loader(url: str, task: dict) -> np.ndarray:
        calls.append((url, task["id"]))
        return read_image(DATASET / "images" / "0045.png")

    data = load_label_studio_export(tasks, loader)
    skipped = data.summary["skipped"]
    assert skipped["cancelled_annotations"] == 1
    assert skipped["box_only_annotations"] == 1 and skipped["empty_annotations"] == 1
    assert skipped["unpaired_rectangles"] == 1  # the far-away box matches no mask
    assert data.summary["images"] == 1 and data.summary["objects"] == 4
    (image,) = data.images
    assert image.split in ("train", "val")
    a, b, c, poly = image.samples
    assert np.array_equal(a.mask, masks[0]) and np.array_equal(b.mask, masks[1]) and np.array_equal(c.mask, masks[2])
    reference = by_id(dataset, 45)[0].samples
    assert a.box.x0 == pytest.approx(reference[0].box.x0 - 3)  # paired by region id
    assert b.box.x1 == pytest.approx(reference[1].box.x1 + 1)  # paired by overlap
    assert (c.box.x0, c.box.y0, c.box.x1, c.box.y1) == (c.x0, c.y0, c.x0 + c.crop.shape[1], c.y0 + c.crop.shape[0])
    iou = np.logical_and(poly.mask, masks[3]).sum() / np.logical_or(poly.mask, masks[3]).sum()
    assert iou > 0.95
    assert image.load_image().shape == (*a.image_size, 3) and calls == [("/data/upload/1/0a1b2c3d-0045.png", 1)]


def test_label_studio_export_file_with_local_images(dataset: Dataset, tmp_path: Path) -> None:
    tasks, _ = make_ls_export(dataset)
    for task in tasks:
        task["data"]["image"] = str(DATASET / "images" / "0045.png")
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    data = load_data(str(path))
    assert data.summary["objects"] == 4 and data.images[0].load_image().shape[2] == 3
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").symlink_to(DATASET / "images" / "0045.png")
    for url in ("pics/a.png", "/data/local-files/?d=pics/a.png"):  # relative to the export's folder
        tasks[0]["data"]["image"] = url
        path.write_text(json.dumps(tasks[:1]))
        assert load_data(str(path)).images[0].load_image().shape == (*data.images[0].samples[0].image_size, 3)
    tasks[0]["data"]["image"] = "/data/upload/1/a.png"  # not on disk, and no Label Studio to ask
    path.write_text(json.dumps(tasks[:1]))
    with pytest.raises(DataError, match="no Label Studio URL"):
        load_data(str(path)).images[0].load_image()
    with pytest.raises(DataError, match="not found"):
        load_data(str(tmp_path / "missing.json"))
    path.write_text(json.dumps([tasks[1]]))
    with pytest.raises(DataError, match="no usable mask"):
        load_data(str(path))


# -- training pieces -----------------------------------------------------------------------------------
def test_embeddings_use_the_serving_key(segmenter: Segmenter, dataset: Dataset, embeddings: TrainingEmbeddings) -> None:
    (image,) = by_id(dataset, 12)
    embedding = embeddings.get(image)
    assert embedding.features.shape == (1, 256, 64, 64)
    disk = embeddings.cache.disk
    assert disk.get(image_key(segmenter.encoder_identity, image.load_image())) is not None
    again = TrainingEmbeddings(segmenter, DiskEmbeddings(disk.root))
    assert torch.equal(again.get(image).features, embedding.features) and again.computed == 0


def test_low_res_target_and_jitter(dataset: Dataset, embeddings: TrainingEmbeddings) -> None:
    (image,) = by_id(dataset, 12)
    sample = image.samples[0]
    target = low_res_target(sample, embeddings.get(image))
    assert target.shape == (256, 256)
    assert abs(float(target.sum()) - sample.area) / sample.area < 0.05  # 256x256 image: same frame
    rng = np.random.default_rng(0)
    moved = [jitter(sample.box, rng, 0.05, 256, 256) for _ in range(20)]
    width = sample.box.x1 - sample.box.x0
    assert all(abs(m.x0 - sample.box.x0) <= 0.05 * width + 1e-6 for m in moved) and len(set(moved)) == 20


def test_training_forward_is_the_serving_forward(segmenter: Segmenter, dataset: Dataset,
                                                 embeddings: TrainingEmbeddings) -> None:
    (image,) = by_id(dataset, 12)
    embedding, boxes = embeddings.get(image), [s.box for s in image.samples[:3]]
    decoder = decoder_copy(segmenter.model.sam.mask_decoder, trainable=True)
    logits, iou, windows = window_forward(segmenter, decoder, embedding, boxes)
    assert logits[0].requires_grad and iou.shape == (3,)
    prompt_encoder = segmenter.model.sam.prompt_encoder
    with torch.no_grad():
        tokens = prepare_image(decoder, prompt_encoder, embedding.features)
        for box, logit, (y0, x0, y1, x1), score in zip(boxes, logits, windows, iou):
            sparse, _ = prompt_encoder(points=None, boxes=input_boxes([box], embedding), masks=None)
            (served,) = decode_windows(decoder, tokens, sparse, [segmenter.grid_window(embedding, box, ())])
            assert (served.y0, served.x0) == (y0, x0) and served.logits.shape == (y1 - y0, x1 - x0)
            assert torch.allclose(served.logits, logit, atol=1e-4) and served.iou == pytest.approx(float(score), abs=1e-5)


def test_loss_counts_target_outside_the_window_as_missed() -> None:
    target = torch.zeros(256, 256)
    target[10:20, 10:30] = 1.0  # 200 pixels, half of them outside the window below
    logits = [torch.full((10, 10), -20.0)]
    logits[0][:, :] = 20.0  # predicts exactly the part inside the window
    inside_only = WindowDiceLoss()(logits, torch.tensor([0.5]), [target], [(10, 10, 20, 20)])
    assert float(inside_only) == pytest.approx(1 - (2 * 100 + 1) / (100 + 200 + 1) + 0.0, abs=1e-3)
    whole = WindowDiceLoss()([torch.full((10, 20), 20.0)], torch.tensor([1.0]), [target], [(10, 10, 20, 30)])
    assert float(whole) < 1e-3  # exact mask, IoU head right: no loss
    unsure = [torch.zeros(10, 20)]  # p = 0.5 everywhere: BCE log 2; focal (alpha 0.25, gamma 2) 20 * log 2 / 8
    bce = WindowDiceLoss()(unsure, torch.tensor([0.0]), [target], [(10, 10, 20, 30)])
    focal = WindowDiceLoss(focal=True)(unsure, torch.tensor([0.0]), [target], [(10, 10, 20, 30)])
    assert float(focal - bce) == pytest.approx((20 * 0.25 * 0.25 - 1) * np.log(2), abs=1e-4)


@pytest.mark.parametrize("loss", ["dice-bce", "dice-focal", "seed-mse"])
def test_decoder_gradients(loss: str, segmenter: Segmenter, dataset: Dataset, embeddings: TrainingEmbeddings) -> None:
    (image,) = by_id(dataset, 12)
    decoder = decoder_copy(segmenter.model.sam.mask_decoder, trainable=True)
    samples = image.samples[:2]
    value = sample_loss(segmenter, decoder, embeddings.get(image), samples, [s.box for s in samples],
                        make_loss(FineTuneConfig(loss=loss)))
    value.backward()
    grads = [p.grad.abs().max().item() for p in decoder.parameters() if p.grad is not None]
    assert all(not p.requires_grad for p in segmenter.model.sam.parameters())  # the base model stays frozen
    if loss.startswith("dice"):
        assert max(grads) > 1e-4 and len(grads) > 100
    else:  # normalize(threshold(x)) over one channel is piecewise constant: its gradient is zero, up to
        # float rounding in normalize's backward (~1e-9 on some images; exactly 0.0 on this one)
        assert float(value.detach()) > 0 and max(grads, default=0.0) < 1e-7


def test_short_run_improves_training_iou(segmenter: Segmenter, dataset: Dataset, embeddings: TrainingEmbeddings) -> None:
    images = [ImageSamples(i.image_id, i.load_image, i.samples, "train") for i in by_id(dataset, 4, 25)]
    before = evaluate(segmenter, embeddings, images)
    config = FineTuneConfig(epochs=10, max_objects_per_image=2, seed=1)  # 20 steps, no val: keeps the last epoch
    result = fine_tune(segmenter, Dataset(images), embeddings, config, progress=False)
    after = evaluate(segmenter, embeddings, images, segmenter.fine_tuned_decoder(result.state))
    assert len(result.curves) == 10 and result.curves[-1]["train_loss"] < result.curves[0]["train_loss"]
    assert after["miou"] > before["miou"] + 0.03, (before["miou"], after["miou"])


def test_training_is_reproducible(segmenter: Segmenter, dataset: Dataset, embeddings: TrainingEmbeddings) -> None:
    train = [ImageSamples(i.image_id, i.load_image, i.samples, "train") for i in by_id(dataset, 4, 12)]
    val = [ImageSamples(i.image_id, i.load_image, i.samples, "val") for i in by_id(dataset, 93, 2)]  # early stop + gate
    config = FineTuneConfig(epochs=2, max_objects_per_image=1, seed=3)
    first, second = (fine_tune(segmenter, Dataset(train + val), embeddings, config, progress=False) for _ in range(2))
    assert all(torch.equal(first.state[k], second.state[k]) for k in first.state)
    untimed = lambda curves: [{k: v for k, v in c.items() if "seconds" not in k} for c in curves]
    assert untimed(first.curves) == untimed(second.curves)
    assert first.val_miou_start is not None and first.best_epoch in (1, 2)
    # the best epoch's early-stopping objects come along (the recalibration is fitted on them, not re-decoded)
    assert first.val_objects and first.val_miou_best == pytest.approx(np.mean([o.iou for o in first.val_objects]),
                                                                      abs=1e-5)
    with pytest.raises(DataError):
        fine_tune(segmenter, Dataset(val), embeddings, config, progress=False)


def test_no_jitter_keeps_the_box() -> None:  # the gate's rules: tests/test_evidence.py
    assert Box(0, 0, 1, 1) == jitter(Box(0, 0, 1, 1), np.random.default_rng(0), 0.0, 10, 10)


def test_label_studio_project_via_sdk(label_studio, ls_project: int, dataset: Dataset) -> None:
    """A real Label Studio project: exported through label-studio-sdk, its image fetched with the token."""
    tasks, masks = make_ls_export(dataset)
    result = [r for r in tasks[0]["annotations"][1]["result"] if r["type"] != "polygonlabels"]  # no polygon tag
    (task_id,) = label_studio.upload_images(ls_project, [DATASET / "images" / "0045.png"])
    label_studio.create_annotation(task_id, result)
    label_studio.create_annotation(task_id, result[:1], was_cancelled=True)
    data = load_data(f"ls://{ls_project}", ImageSource(label_studio.url, label_studio.token))
    assert data.summary["objects"] == 3 and data.summary["skipped"]["cancelled_annotations"] == 1
    assert data.summary["source"].endswith(f"/projects/{ls_project}")
    (image,) = data.images
    assert [np.array_equal(s.mask, m) for s, m in zip(image.samples, masks)] == [True, True, True]
    assert np.array_equal(image.load_image(), read_image(DATASET / "images" / "0045.png"))
    with pytest.raises(DataError, match="cannot export"):
        load_data("ls://999999", ImageSource(label_studio.url, label_studio.token))
