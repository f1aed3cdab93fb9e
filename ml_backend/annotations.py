"""Label Studio annotations -> training samples: a JSON export (file or list of tasks) or a project.

The edge for training data, as protocol.py is for predictions: percentages, brush RLE and polygons become pixel
boxes and bool masks (`trainer.data.Sample`) here, and the trainer sees nothing else.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

from trainer.data import (DataError, Dataset, ImageSamples, Sample, assign_splits, dataset_summary, load_coco,
                          read_image, read_json)
from trainer.types import Box

from . import protocol
from .fetch import ImageError, ImageFetcher, ImageSource
from .label_studio import ConnectError, ProjectClient
from .protocol import region_label

log = logging.getLogger(__name__)

ImageLoader = Callable[[str, dict], np.ndarray]  # (image URL, task) -> RGB uint8 (H, W, 3)


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
    summary = dataset_summary(images, source or "label-studio-export", skipped)
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
    """A rectangle region -> its axis-aligned pixel box in the frame its annotation was drawn on."""
    return protocol.region_to_box(region, int(region["original_width"]), int(region["original_height"]))


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
                masks.append((region.get("id"), _region_mask(region, kind), region_label(region)))
        except (KeyError, TypeError, ValueError, IndexError) as exc:  # ProtocolError is a ValueError
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


def task_image_loader(source: ImageSource, root: Path | None = None,
                      fetcher: ImageFetcher | None = None) -> ImageLoader:
    """Task images: an export's local files (relative to root, or /data/local-files/?d=...) are read from disk;
    every other URL goes through serving's SSRF-checked loader (`fetcher`, a project client's, else one of
    `source`: Label Studio with its token, ALLOWED_IMAGE_HOSTS, cloud URIs through Label Studio's presign, data:
    URIs) and is refused otherwise.
    """
    remote = fetcher or ImageFetcher(source)

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
def load_label_studio_project(client: ProjectClient, val_fraction: float = 0.2) -> Dataset:
    """Export a Label Studio project's annotated tasks (JSON) through its client and parse them; the images come
    through the same client (one token)."""
    base_url = (client.source.label_studio_url or "").rstrip("/")
    try:
        label_config, tasks = client.export()
    except ConnectError as exc:
        raise DataError(f"cannot export Label Studio project {client.project} from {base_url}: {exc}") from exc
    return load_label_studio_export(tasks, task_image_loader(client.source, fetcher=client.images),
                                    image_data_key(label_config), val_fraction,
                                    source=f"label-studio-project:{base_url}/projects/{client.project}")


def image_data_key(label_config: str) -> str | None:
    """The task data field of the label config's Image (protocol.parse_label_config's reading), if any."""
    try:
        return protocol.parse_label_config(label_config).image_key
    except protocol.ProtocolError:
        return None


# -- entry point ----------------------------------------------------------------------------------------
def load_data(spec: str, source: ImageSource = ImageSource(), val_fraction: float = 0.2) -> Dataset:
    """A COCO folder, a Label Studio JSON export file, or `ls://<project id>` (needs source's URL and token):
    what `python -m ml_backend --data` accepts. source also says which image URLs of an export may be fetched.
    """
    if spec.startswith("ls://"):
        raw = spec[len("ls://"):].strip("/")
        if not raw.isdigit():
            raise DataError(f"{spec!r}: a Label Studio project is given as ls://<project id>")
        if not source.label_studio_url or not source.token:
            raise DataError("ls://<project id> needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        return load_label_studio_project(ProjectClient(source, raw), val_fraction=val_fraction)
    path = Path(spec)
    if path.is_dir():
        return load_coco(path, val_fraction)
    if path.is_file():
        return load_label_studio_export(path, task_image_loader(source, root=path.parent), val_fraction=val_fraction)
    raise DataError(f"data path not found: {spec}")
