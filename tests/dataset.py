"""The shared dsb2018_nuclei COCO dataset (read from ../shared, never copied)."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT.parent / "shared" / "datasets" / "dsb2018_nuclei"


@lru_cache(maxsize=1)
def coco() -> dict:
    return json.loads((DATASET / "annotations.json").read_text())


@lru_cache(maxsize=1)
def splits() -> dict[str, list[int]]:
    return json.loads((DATASET / "splits.json").read_text())


def image_info(image_id: int) -> dict:
    return next(i for i in coco()["images"] if i["id"] == image_id)


def image_path(image_id: int) -> Path:
    return DATASET / "images" / image_info(image_id)["file_name"]


def load_image(image_id: int) -> np.ndarray:
    return np.array(Image.open(image_path(image_id)).convert("RGB"))


def annotations(image_id: int) -> list[dict]:
    return [a for a in coco()["annotations"] if a["image_id"] == image_id]


def gt_mask(annotation: dict) -> np.ndarray:
    return mask_utils.decode(annotation["segmentation"]).astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def make_coco(folder: Path, subset: dict[str, list[int]]) -> Path:
    """A COCO folder with the subset's images (symlinks), their annotations and splits.json."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    full = json.loads((DATASET / "annotations.json").read_text())
    ids = {i for split in subset.values() for i in split}
    images = [i for i in full["images"] if i["id"] in ids]
    for image in images:
        link = folder / "images" / image["file_name"]
        if not link.exists():
            link.symlink_to(DATASET / "images" / image["file_name"])
    (folder / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": [a for a in full["annotations"] if a["image_id"] in ids],
         "categories": full["categories"]}))
    (folder / "splits.json").write_text(json.dumps(subset))
    return folder
