"""Training data: (image, box, mask, label) samples from a COCO folder, a Label Studio export or project.

Masks are kept as crops around the object (a full-frame bool mask per object would not fit in memory for
large projects); `Sample.mask` gives the full (H, W) bool array when needed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

from .images import ImageError, ImageSource, decode_image
from .images import ImageLoader as UrlImageLoader
from .types import Box, Mask

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
ImageLoader = Callable[[str, dict], np.ndarray]  # (image URL, task) -> RGB uint8 (H, W, 3)


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

    @property
    def labels(self) -> list[str]:
        return sorted({s.label for i in self.images for s in i.samples})


# -- splits -------------------------------------------------------------------------------------------
def hash_fraction(image_id: str) -> float:
    """A stable number in [0, 1) from the sha256 of the image id."""
    return int(hashlib.sha256(image_id.encode()).hexdigest()[:15], 16) / 16**15


def assign_splits(images: list[ImageSamples], val_fraction: float = 0.2) -> None:
    """Deterministic train/val split by image-id hash, for images without a split.

    With two or more images at least one goes to val and at least one stays in train.
    """
    pending = [i for i in images if i.split is None]
    for image in pending:
        image.split = "val" if hash_fraction(image.image_id) < val_fraction else "train"
    if len(pending) >= 2 and not any(i.split == "val" for i in pending):
        min(pending, key=lambda i: hash_fraction(i.image_id)).split = "val"
    if len(pending) >= 2 and not any(i.split == "train" for i in pending):
        max(pending, key=lambda i: hash_fraction(i.image_id)).split = "train"


def _summarise(images: list[ImageSamples], source: str, skipped: dict | None = None) -> dict:
    labels = Counter(s.label for i in images for s in i.samples)
    per_split = {}
    for name in SPLITS:
        chosen = [i for i in images if i.split == name]
        if chosen:
            per_split[name] = {"images": len(chosen), "objects": sum(len(i.samples) for i in chosen)}
    return {"source": source, "images": len(images), "objects": sum(len(i.samples) for i in images),
            "labels": dict(sorted(labels.items())), "splits": per_split, "skipped": dict(skipped or {})}


# -- images -------------------------------------------------------------------------------------------
def read_image(path: Path, max_pixels: int = ImageSource.max_pixels) -> np.ndarray:
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
    summary = _summarise(images, f"coco:{folder}", skipped)
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


# -- Label Studio export --------------------------------------------------------------------------------
def load_label_studio_export(tasks: list[dict] | Path | str, image_loader: ImageLoader | None = None,
                             image_key: str | None = None, val_fraction: float = 0.2,
                             source: str | None = None) -> Dataset:
    """A Label Studio JSON export (list of tasks) -> samples; brush and polygon regions become masks.

    Each task uses one annotation: the ground-truth one if marked, else the most recently updated one that is
    not cancelled and holds a mask. Cancelled, empty and box-only annotations are skipped and counted.
    image_loader(url, task) loads a task's image; the default (`task_image_loader`) reads an export file's local
    paths and fetches nothing but data: URIs.
    """
    if not isinstance(tasks, list):
        path = Path(tasks)
        if not path.is_file():
            raise DataError(f"Label Studio export not found: {path}")
        tasks = read_json(path)
        source = source or f"label-studio-export:{path}"
        image_loader = image_loader or task_image_loader(ImageSource(), root=path.parent)
    if not isinstance(tasks, list):
        raise DataError("a Label Studio JSON export must be a list of tasks")
    image_loader = image_loader or task_image_loader(ImageSource())
    skipped = Counter()
    images = []
    for task in tasks:
        annotations = task.get("annotations") or []
        if not annotations:
            skipped["tasks_without_annotations"] += 1
            continue
        usable = []
        for ann in annotations:
            if ann.get("was_cancelled"):
                skipped["cancelled_annotations"] += 1
                continue
            kinds = {_region_kind(r) for r in ann.get("result") or []}
            if not kinds - {None}:
                skipped["empty_annotations"] += 1
            elif not kinds & {"brush", "polygon"}:
                skipped["box_only_annotations"] += 1
            else:
                usable.append(ann)
        if not usable:
            continue
        chosen = max(usable, key=lambda a: (bool(a.get("ground_truth")), str(a.get("updated_at") or ""),
                                            a.get("id") or 0))
        skipped["superseded_annotations"] += len(usable) - 1
        image_id = str(task.get("id", len(images)))
        samples = _annotation_samples(image_id, chosen.get("result") or [], skipped)
        if not samples:
            skipped["tasks_without_masks"] += 1
            continue
        url = _task_image_url(task, chosen.get("result") or [], image_key)
        images.append(ImageSamples(image_id, _ls_loader(image_loader, url, task, samples[0].image_size), samples))
    skipped = {k: v for k, v in skipped.items() if v}
    if not images:
        raise DataError(f"no usable mask annotation in {len(tasks)} Label Studio tasks (skipped: {skipped})")
    assign_splits(images, val_fraction)
    summary = _summarise(images, source or "label-studio-export", skipped)
    summary["tasks"] = len(tasks)
    log.info("Label Studio data: %d images, %d objects; skipped %s", summary["images"], summary["objects"], skipped)
    return Dataset(images, summary)


def _region_kind(region: dict) -> str | None:
    value = region.get("value") or {}
    kind = region.get("type", "")
    if "rle" in value or kind == "brushlabels":
        return "brush" if value.get("rle") else None
    if "points" in value or kind == "polygonlabels":
        return "polygon" if len(value.get("points") or []) >= 3 else None
    if kind == "rectanglelabels" or {"x", "y", "width", "height"} <= set(value):
        return "rectangle"
    return None


def _region_label(region: dict) -> str:
    value = region.get("value") or {}
    for key in ("brushlabels", "polygonlabels", "rectanglelabels", "labels"):
        if value.get(key):
            return str(value[key][0])
    return "object"


MAX_MASK_PIXELS = 100_000_000  # a region's original_width x original_height
MAX_RLE_LENGTH = 50_000_000  # ints in a brush RLE
MAX_POLYGON_POINTS = 100_000


def _region_mask(region: dict, kind: str) -> np.ndarray:
    """bool (H, W) from a brush RLE or a polygon in percent; oversized regions raise ValueError (skipped)."""
    height, width = int(region["original_height"]), int(region["original_width"])
    if not (0 < height and 0 < width and height * width <= MAX_MASK_PIXELS):
        raise ValueError(f"region size {width}x{height} is out of range")
    value = region["value"]
    if kind == "brush":
        from label_studio_sdk.converter.brush import decode_rle

        rle = value["rle"]
        if not isinstance(rle, list) or not 4 <= len(rle) <= MAX_RLE_LENGTH:
            raise ValueError(f"brush RLE is not a list of 4 to {MAX_RLE_LENGTH} ints")
        declared = int.from_bytes(bytes(int(b) & 0xFF for b in rle[:4]), "big")  # the header's value count
        if declared != height * width * 4:  # checked before decode_rle allocates it
            raise ValueError(f"brush RLE declares {declared} values, not {width}x{height}x4")
        return decode_rle(rle).reshape(height, width, 4)[:, :, 3] > 127
    if not isinstance(value["points"], list) or not 3 <= len(value["points"]) <= MAX_POLYGON_POINTS:
        raise ValueError(f"a polygon needs 3 to {MAX_POLYGON_POINTS} points")
    points = np.array([[p[0] * width / 100.0, p[1] * height / 100.0] for p in value["points"]], dtype=np.float64)
    if not np.isfinite(points).all():
        raise ValueError("polygon points must be finite numbers")
    canvas = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(canvas, [np.round(points * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def _rectangle_box(region: dict) -> Box:
    """A rectangle region (percent, rotation in degrees about its top-left) -> its axis-aligned pixel box."""
    height, width = float(region["original_height"]), float(region["original_width"])
    v = region["value"]
    x, y, w, h = v["x"] * width / 100, v["y"] * height / 100, v["width"] * width / 100, v["height"] * height / 100
    angle = math.radians(float(v.get("rotation") or 0.0))
    cos, sin = math.cos(angle), math.sin(angle)
    corners = [(x + dx * cos - dy * sin, y + dx * sin + dy * cos) for dx, dy in ((0, 0), (w, 0), (0, h), (w, h))]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    return Box(min(xs), min(ys), max(xs), max(ys), _region_label(region)).clipped(int(width), int(height))


def _box_iou(a: Box, b: Box) -> float:
    iw = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    ih = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = iw * ih
    union = (a.x1 - a.x0) * (a.y1 - a.y0) + (b.x1 - b.x0) * (b.y1 - b.y0) - inter
    return inter / union if union > 0 else 0.0


def _annotation_samples(image_id: str, result: list[dict], skipped: Counter, min_overlap: float = 0.5) -> list[Sample]:
    """Masks of one annotation, each paired with its rectangle: same region id, else best box IoU, else extent."""
    rects: dict[int, tuple[str | None, Box]] = {}
    masks = []
    for region in result:
        kind = _region_kind(region)
        try:
            if kind == "rectangle":
                rects[len(rects)] = (region.get("id"), _rectangle_box(region))
            elif kind in ("brush", "polygon"):
                masks.append((region.get("id"), _region_mask(region, kind), _region_label(region)))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            skipped["unreadable_regions"] += 1
            log.warning("task image %s: skipping an unreadable %s region: %s", image_id, kind, exc)
    samples, pending = [], []
    for region_id, mask, label in masks:
        sample = Sample.from_mask(image_id, mask, label)
        if sample is None:
            skipped["empty_masks"] += 1
            continue
        match = next((k for k, (rid, _) in rects.items() if region_id is not None and rid == region_id), None)
        if match is not None:
            box = rects.pop(match)[1]
            samples.append(_with_box(sample, box))
        else:
            pending.append(sample)
    pairs = sorted(((_box_iou(s.box, box), i, k) for i, s in enumerate(pending) for k, (_, box) in rects.items()),
                   reverse=True)
    paired: dict[int, Box] = {}
    for overlap, i, k in pairs:
        if overlap < min_overlap:
            break
        if i not in paired and k in rects:
            paired[i] = rects.pop(k)[1]
    for i, sample in enumerate(pending):
        samples.append(_with_box(sample, paired[i]) if i in paired else sample)
    skipped["unpaired_rectangles"] += len(rects)
    return samples


def _with_box(sample: Sample, box: Box) -> Sample:
    if box.is_empty:
        return sample
    return Sample(sample.image_id, Box(box.x0, box.y0, box.x1, box.y1, sample.label), sample.crop, sample.x0,
                  sample.y0, sample.image_size, sample.label)


def _task_image_url(task: dict, result: list[dict], image_key: str | None) -> str:
    data = task.get("data") or {}
    keys = [image_key] if image_key else []
    keys += [r.get("to_name") for r in result if r.get("to_name")] + ["image", "img", "url"]
    for key in keys:
        if isinstance(data.get(key), str):
            return data[key]
    candidates = [v for v in data.values() if isinstance(v, str) and re.search(r"\.(png|jpe?g|tiff?|bmp|webp)\b|^/data/|^\w+://", v, re.I)]
    if len(candidates) == 1:
        return candidates[0]
    raise DataError(f"task {task.get('id')}: cannot tell which data field is the image (pass image_key)")


def _ls_loader(loader: ImageLoader, url: str, task: dict, size: tuple[int, int]) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        image = loader(url, task)
        if image.shape[:2] != size:
            raise DataError(f"task {task.get('id')}: image is {image.shape[1]}x{image.shape[0]}, "
                            f"its annotation says {size[1]}x{size[0]}")
        return image

    return load


def task_image_loader(source: ImageSource, root: Path | None = None) -> ImageLoader:
    """Task images: an export's local files (relative to root, or /data/local-files/?d=...) are read from disk;
    every other URL goes through serving's SSRF-checked loader (Label Studio with its token, ALLOWED_IMAGE_HOSTS,
    cloud URIs through Label Studio's presign, data: URIs) and is refused otherwise.
    """
    remote = UrlImageLoader(source)

    def load(url: str, task: dict) -> np.ndarray:
        local = _local_file(url, root)
        if local is not None:
            return read_image(local, source.max_pixels)
        try:
            return remote.load(url, task.get("id"))
        except ImageError as exc:
            raise DataError(f"task {task.get('id')}: {exc}") from exc

    return load


def _local_file(url: str, root: Path | None) -> Path | None:
    """The file an export's image URL names on this machine, if any: relative to the export's folder, or absolute."""
    parts = urlsplit(url)
    if root is None or parts.scheme:
        return None
    if parts.path.startswith("/data/local-files"):  # d= is relative to Label Studio's document root
        name = parse_qs(parts.query).get("d", [""])[0].lstrip("/")
        candidates = [root / name, Path("/") / name] if name else []
    else:
        candidates = [root / url.lstrip("/")] + ([Path(url)] if url.startswith("/") else [])
    return next((c for c in candidates if c.is_file()), None)


# -- Label Studio project -------------------------------------------------------------------------------
def load_label_studio_project(project_id: int, source: ImageSource, image_loader: ImageLoader | None = None,
                              val_fraction: float = 0.2) -> Dataset:
    """Export a Label Studio project's annotated tasks (JSON) through label-studio-sdk and parse them.

    source: Label Studio's URL and token (legacy token or personal access token), and the image-fetching rules.
    """
    from label_studio_sdk import LabelStudio

    base_url = source.label_studio_url or ""
    client = LabelStudio(base_url=base_url, api_key=source.token)
    try:
        project = client.projects.get(id=project_id)
        chunks = client.projects.exports.download_sync(id=project_id, export_type="JSON")
        tasks = json.loads(b"".join(chunks))
    except Exception as exc:  # the SDK raises its own ApiError, httpx errors, JSON errors
        raise DataError(f"cannot export Label Studio project {project_id} from {base_url}: {exc}") from exc
    return load_label_studio_export(tasks, image_loader or task_image_loader(source),
                                    image_data_key(project.label_config or ""), val_fraction,
                                    source=f"label-studio-project:{base_url.rstrip('/')}/projects/{project_id}")


def image_data_key(label_config: str) -> str | None:
    """The task data field of the label config's first <Image value="$field">, if any."""
    try:
        root = ET.fromstring(label_config)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.lower() == "image" and element.get("value", "").startswith("$"):
            return element.get("value")[1:]
    return None


# -- entry point ----------------------------------------------------------------------------------------
def load_data(spec: str, source: ImageSource = ImageSource(), val_fraction: float = 0.2) -> Dataset:
    """A COCO folder, a Label Studio JSON export file, or `ls://<project id>` (needs source's URL and token).

    source also says which image URLs of an export may be fetched (see `trainer.images`).
    """
    if spec.startswith("ls://"):
        raw = spec[len("ls://"):].strip("/")
        if not raw.isdigit():
            raise DataError(f"{spec!r}: a Label Studio project is given as ls://<project id>")
        if not source.label_studio_url or not source.token:
            raise DataError("ls://<project id> needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        return load_label_studio_project(int(raw), source, val_fraction=val_fraction)
    path = Path(spec)
    if path.is_dir():
        return load_coco(path, val_fraction)
    if path.is_file():
        return load_label_studio_export(path, task_image_loader(source, root=path.parent), val_fraction=val_fraction)
    raise DataError(f"data path not found: {spec}")


def iter_samples(images: Iterable[ImageSamples]) -> Iterable[Sample]:
    for image in images:
        yield from image.samples
