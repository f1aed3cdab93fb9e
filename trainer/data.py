"""Training data: (image, box, mask, label) samples, and the COCO-folder source of them.

Label Studio exports and projects become the same samples at the edge (`ml_backend.annotations`).

Masks are kept as crops around the object (a full-frame bool mask per object would not fit in memory for
large projects); `Sample.mask` gives the full (H, W) bool array when needed.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .evidence import GATE_IMAGES_WANTED, MIN_GATE_OBJECTS
from .images import MAX_PIXELS, decode_image
from .types import Box, Mask

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """The data source is missing, unreadable or holds no usable object."""


@dataclass(frozen=True)
class Sample:
    """One object: its box prompt (original pixels), its mask as a crop at (x0, y0), its label."""

    image_id: str
    box: Box
    crop: np.ndarray  # bool (h, w)
    x0: int
    y0: int
    image_size: tuple[int, int]  # (H, W)
    label: str

    @property
    def mask(self) -> np.ndarray:
        """bool (H, W)."""
        return Mask(self.crop, self.x0, self.y0, self.image_size, score=1.0).full()

    @property
    def area(self) -> int:
        return int(self.crop.sum())

    @classmethod
    def from_mask(cls, image_id: str, mask: np.ndarray, label: str, box: Box | None = None) -> "Sample | None":
        """A sample from a full bool (H, W) mask; the box defaults to the mask's extent. None if empty."""
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            return None
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        if box is None:
            box = Box(float(x0), float(y0), float(x1), float(y1), label)
        crop = np.ascontiguousarray(mask[y0:y1, x0:x1].astype(bool))
        return cls(image_id, box, crop, x0, y0, (int(mask.shape[0]), int(mask.shape[1])), label)


@dataclass
class ImageSamples:
    """The objects of one image. image_id also seeds the hash split; load_image() -> RGB uint8 (H, W, 3)."""

    image_id: str
    load_image: Callable[[], np.ndarray]
    samples: list[Sample]
    split: str | None = None


@dataclass
class Dataset:
    """Images with their samples, plus a summary (counts, skipped annotations) for logs and manifests."""

    images: list[ImageSamples]
    summary: dict = field(default_factory=dict)

    def split(self, name: str) -> list[ImageSamples]:
        return [i for i in self.images if i.split == name]


# -- splits -------------------------------------------------------------------------------------------
def hash_fraction(image_id: str) -> float:
    """A stable number in [0, 1) from the sha256 of the image id."""
    return int(hashlib.sha256(image_id.encode()).hexdigest()[:15], 16) / 16**15


def _objects(images: list[ImageSamples]) -> int:
    return sum(len(i.samples) for i in images)


def held_out_sets(images: list[ImageSamples], min_gate_objects: int = 0, min_gate_images: int = 1,
                  wanted_gate_images: int = 0) -> tuple[list[ImageSamples], list[ImageSamples]]:
    """The held-out images in two disjoint sets: (early stopping and score calibration, the promotion gate).

    A "gate" split is taken as given; otherwise the "val" images alternate in id-hash order, the first to the
    gate (one val image: a gate and no early stopping), so the gate never judges what picked the epoch. In a
    small project the gate comes first (without it nothing can be promoted; early stopping without images keeps
    the last epoch): when it holds fewer objects or images than a promotion needs (trainer/evidence.py) but the
    val images together hold enough, early-stopping images move to it, in hash order, until it has them; then
    more, up to `wanted_gate_images` images, while one early-stopping image stays.
    """
    gate = [i for i in images if i.split == "gate"]
    val = sorted((i for i in images if i.split == "val"), key=lambda i: hash_fraction(i.image_id))
    if gate:
        return val, gate
    early, gate = val[1::2], val[0::2]
    if _objects(val) >= min_gate_objects and len(val) >= min_gate_images:
        while _objects(gate) < min_gate_objects or len(gate) < min_gate_images:
            gate.append(early.pop(0))
    while len(gate) < wanted_gate_images and len(early) > 1:
        gate.append(early.pop(0))
    return early, gate


def assign_splits(images: list[ImageSamples], val_fraction: float = 0.2,
                  min_val_objects: int = 2 * MIN_GATE_OBJECTS, min_val_images: int = GATE_IMAGES_WANTED + 1) -> None:
    """Deterministic train/val split by image-id hash, for images without a split.

    With two or more images at least one goes to val and at least one stays in train. A small project's
    `val_fraction` holds too few objects for a gate that can promote (trainer/evidence.py) and an early-stopping
    set: then more images go to val, lowest hash first, until val holds `min_val_objects` objects (a gate's
    minimum and as many to early-stop on and fit the score's calibration) on `min_val_images` images (the gate
    a small project wants, and one), or half the images (the rest train). As the project grows, the number held out
    follows its size, so an image may change sides: a served version may then be gated on an image it was
    trained on, which favours it over the new one (the gate errs towards keeping what is served).
    """
    pending = [i for i in images if i.split is None]
    for image in pending:
        image.split = "val" if hash_fraction(image.image_id) < val_fraction else "train"
    if len(pending) >= 2 and not any(i.split == "val" for i in pending):
        min(pending, key=lambda i: hash_fraction(i.image_id)).split = "val"
    if len(pending) >= 2 and not any(i.split == "train" for i in pending):
        max(pending, key=lambda i: hash_fraction(i.image_id)).split = "train"
    val = [i for i in pending if i.split == "val"]
    train = sorted((i for i in pending if i.split == "train"), key=lambda i: hash_fraction(i.image_id))
    while train and len(val) < len(pending) // 2 and (_objects(val) < min_val_objects or len(val) < min_val_images):
        image = train.pop(0)
        image.split = "val"
        val.append(image)


def dataset_summary(images: list[ImageSamples], source: str, skipped: dict | None = None) -> dict:
    labels = Counter(s.label for i in images for s in i.samples)
    per_split = {}
    for name in SPLITS:
        chosen = [i for i in images if i.split == name]
        if chosen:
            per_split[name] = {"images": len(chosen), "objects": sum(len(i.samples) for i in chosen)}
    return {"source": source, "images": len(images), "objects": sum(len(i.samples) for i in images),
            "labels": dict(sorted(labels.items())), "splits": per_split, "skipped": dict(skipped or {})}


# -- images -------------------------------------------------------------------------------------------
def read_image(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file -> RGB uint8 (H, W, 3), decoded as serving decodes task images."""
    try:
        return decode_image(Path(path).read_bytes(), max_pixels)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


def read_json(path: Path) -> object:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise DataError(f"cannot read {path}: {exc}") from exc


# -- COCO ---------------------------------------------------------------------------------------------
def load_coco(folder: Path | str, val_fraction: float = 0.2) -> Dataset:
    """A COCO folder: images/ + annotations.json (RLE or polygon segmentations), optional splits.json."""
    from pycocotools import mask as mask_utils

    folder = Path(folder)
    ann_path = folder / "annotations.json"
    if not ann_path.is_file():
        raise DataError(f"{folder} is not a COCO folder: annotations.json not found")
    coco = read_json(ann_path)
    categories = {c["id"]: c["name"] for c in coco.get("categories", [])}
    split_of: dict[int, str] = {}
    if (folder / "splits.json").is_file():
        for name, ids in read_json(folder / "splits.json").items():
            split_of.update({int(i): name for i in ids})
    by_image: dict[int, list[dict]] = {}
    for ann in coco.get("annotations", []):
        by_image.setdefault(ann["image_id"], []).append(ann)
    skipped = Counter()
    images = []
    for info in coco.get("images", []):
        height, width = int(info["height"]), int(info["width"])
        image_id = str(info["id"])
        samples = []
        for ann in by_image.get(info["id"], []):
            if ann.get("iscrowd"):
                skipped["crowd"] += 1
                continue
            mask = _coco_mask(mask_utils, ann.get("segmentation"), height, width)
            label = categories.get(ann.get("category_id"), str(ann.get("category_id")))
            sample = Sample.from_mask(image_id, mask, label) if mask is not None else None
            if sample is None:
                skipped["empty_masks"] += 1
                continue
            samples.append(sample)
        if not samples:
            skipped["images_without_objects"] += 1
            continue
        path = folder / "images" / info["file_name"]
        if not path.is_file():
            path = folder / info["file_name"]
        images.append(ImageSamples(image_id, _coco_loader(path, height, width), samples,
                                   split_of.get(int(info["id"])) if split_of else None))
    if not images:
        raise DataError(f"{folder}: no image with a usable mask annotation")
    assign_splits(images, val_fraction)
    summary = dataset_summary(images, f"coco:{folder}", skipped)
    log.info("COCO %s: %s", folder, summary)
    return Dataset(images, summary)


def _coco_mask(mask_utils, segmentation, height: int, width: int) -> np.ndarray | None:
    if not segmentation:
        return None
    if isinstance(segmentation, list):  # polygons
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(bool)


def _coco_loader(path: Path, height: int, width: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        image = read_image(path)
        if image.shape[:2] != (height, width):
            raise DataError(f"{path}: image is {image.shape[1]}x{image.shape[0]}, annotations say {width}x{height}")
        return image

    return load
