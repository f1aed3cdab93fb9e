"""The stateless runtime against segment-anything's own forward, on real LiteMedSAM weights."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests import dataset
from trainer.cache import DiskEmbeddings, EmbeddingCache, image_key
from trainer.models import ModelLoadError, load_model
from trainer.runtime import preprocess
from trainer.types import Box, Point, Prompts

IMAGE_ID = 6  # a 256x256 test-split image with 9 nuclei


def _boxes(image_id: int, n: int) -> list[tuple[Box, dict]]:
    out = []
    for a in dataset.annotations(image_id)[:n]:
        x, y, w, h = a["bbox"]
        out.append((Box(x, y, x + w, y + h, "nucleus"), a))
    return out


def _reference_mask(model, embedding, image, box: Box) -> tuple[np.ndarray, float]:
    """segment-anything's MaskDecoder forward + postprocessing (upscale, crop padding, resize)."""
    sam = model.sam
    height, width = image.shape[:2]
    _, (new_h, new_w) = preprocess(image, model)
    scaled = torch.tensor([[box.x0 * new_w / width, box.y0 * new_h / height,
                            box.x1 * new_w / width, box.y1 * new_h / height]])
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(points=None, boxes=scaled, masks=None)
        low_res, iou = sam.mask_decoder(embedding.features, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
        up = F.interpolate(low_res, (model.input_size, model.input_size), mode="bilinear", align_corners=False)
        up = F.interpolate(up[..., :new_h, :new_w], (height, width), mode="bilinear", align_corners=False)
    return (up[0, 0] > 0).numpy(), float(iou[0, 0])


def test_decode_matches_segment_anything_forward(lite_medsam, segmenter):
    image = dataset.load_image(IMAGE_ID)
    embedding = segmenter.embed(image)
    assert embedding.features.shape == (1, 256, 64, 64)
    pairs = _boxes(IMAGE_ID, 6)
    masks = segmenter.decode(embedding, Prompts(boxes=tuple(b for b, _ in pairs)))
    assert len(masks) == len(pairs)
    for (box, annotation), mask in zip(pairs, masks):
        reference, reference_score = _reference_mask(lite_medsam, embedding, image, box)
        assert mask.full().shape == image.shape[:2]
        assert dataset.iou(mask.full(), reference) > 0.99
        assert mask.quality.predicted_iou == pytest.approx(reference_score, abs=1e-4)
        assert mask.label == "nucleus"


def test_masks_match_ground_truth_reasonably(segmenter):
    image = dataset.load_image(IMAGE_ID)
    pairs = _boxes(IMAGE_ID, 9)
    masks = segmenter.decode(segmenter.embed(image), Prompts(boxes=tuple(b for b, _ in pairs)))
    ious = [dataset.iou(m.full(), dataset.gt_mask(a)) for m, (_, a) in zip(masks, pairs)]
    assert np.mean(ious) > 0.6


def test_non_square_image_box_scaling(segmenter):
    """A wide image: boxes must be scaled into the model's padded frame, masks back to the original."""
    info = next(i for i in dataset.coco()["images"] if i["width"] != i["height"])
    image = dataset.load_image(info["id"])
    pairs = _boxes(info["id"], 5)
    masks = segmenter.decode(segmenter.embed(image), Prompts(boxes=tuple(b for b, _ in pairs)))
    ious = [dataset.iou(m.full(), dataset.gt_mask(a)) for m, (_, a) in zip(masks, pairs)]
    assert np.mean(ious) > 0.5, ious


def test_clicks_alone_and_with_box(segmenter):
    """LiteMedSAM is box-trained: a click alone goes through the box search and still finds the nucleus."""
    image = dataset.load_image(18)
    embedding = segmenter.embed(image)
    ious = []
    for box, annotation in _boxes(18, 6):
        cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
        (from_click,) = segmenter.decode(embedding, Prompts(points=(Point(cx, cy, True, "nucleus"),)))
        assert from_click.full()[int(cy), int(cx)] and from_click.label == "nucleus"
        ious.append(dataset.iou(from_click.full(), dataset.gt_mask(annotation)))
    assert np.mean(ious) > 0.6, ious
    (refined,) = segmenter.decode(embedding, Prompts(boxes=(box,), points=(Point(cx, cy, True),)))
    assert dataset.iou(refined.full(), dataset.gt_mask(annotation)) > 0.5
    with pytest.raises(ValueError):
        segmenter.decode(embedding, Prompts(boxes=(box, box), points=(Point(cx, cy),)))


def test_empty_prompts_and_bad_image(segmenter):
    image = dataset.load_image(IMAGE_ID)
    assert segmenter.decode(segmenter.embed(image), Prompts()) == []
    with pytest.raises(ValueError):
        segmenter.embed(image[..., 0])


def test_bad_checkpoints_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("vit_b", tmp_path / "missing.pth")
    with pytest.raises(ModelLoadError, match="needs a checkpoint"):
        load_model("mobile_sam")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model("lite_medsam", garbage)
    with pytest.raises(ModelLoadError, match="sha256"):
        load_model("lite_medsam", expected_sha256="00" * 32)
    with pytest.raises(ModelLoadError, match="unknown SAM variant"):
        load_model("vit_z", garbage)


def test_cache_single_flight_and_bound(segmenter, tmp_path):
    image = dataset.load_image(IMAGE_ID)
    one_mb = 1024 * 1024
    cache = EmbeddingCache(max_mb=9, disk=DiskEmbeddings(tmp_path))
    calls = []
    gate = threading.Event()

    def compute():
        calls.append(1)
        gate.wait(5)
        return segmenter.embed(image)

    key = image_key(segmenter.encoder_identity, image)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_compute(key, compute)))
               for _ in range(8)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(30)
    assert len(calls) == 1 and len(results) == 8
    assert sum(1 for _, hit in results if not hit) == 1
    assert all(r[0] is results[0][0] for r in results)
    # bounded: each embedding is 4 MB, so a 9 MB cache keeps two
    embedding = results[0][0]
    for i in range(4):
        cache.get_or_compute(f"x/{i}", lambda: embedding)
    assert len(cache) == 2 and cache.size_bytes <= 9 * one_mb
    # the disk copy serves a fresh cache without computing
    fresh = EmbeddingCache(max_mb=64, disk=DiskEmbeddings(tmp_path))
    loaded, hit = fresh.get_or_compute(key, lambda: pytest.fail("recomputed"))
    assert hit  # a disk hit is a hit: nothing was computed
    assert torch.equal(loaded.features, embedding.features) and loaded.original_size == (256, 256)


def test_damaged_disk_embedding_is_recomputed(segmenter, tmp_path):
    image = dataset.load_image(IMAGE_ID)
    key = image_key(segmenter.encoder_identity, image)
    disk = DiskEmbeddings(tmp_path)
    disk.put(key, segmenter.embed(image))
    path = next(tmp_path.rglob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:100])
    assert disk.get(key) is None and not path.exists()


class _Exploit:
    def __reduce__(self):
        return (open, ("/tmp/sam-backend-pwned", "w"))


def test_hostile_pickle_checkpoint_is_refused(tmp_path):
    """Checkpoints are loaded with weights_only=True: a pickle that runs code is refused, nothing runs."""
    import os
    import pickle

    target = "/tmp/sam-backend-pwned"
    if os.path.exists(target):
        os.unlink(target)
    hostile = tmp_path / "hostile.pth"
    hostile.write_bytes(pickle.dumps({"model": _Exploit()}))
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model("lite_medsam", hostile)
    assert not os.path.exists(target)


def test_embed_many_is_embed_in_one_forward(segmenter):
    images = [dataset.load_image(IMAGE_ID), dataset.load_image(dataset.splits()["test"][3])]
    for one, batched in zip([segmenter.embed(i) for i in images], segmenter.embed_many(images)):
        assert torch.allclose(one.features, batched.features, atol=1e-4)
        assert (one.original_size, one.resized_size) == (batched.original_size, batched.resized_size)
