"""Masks as crops (`Mask`): the few edits and measures clicks need -- whether a mask covers a click, union, IoU,
the cut a negative click makes and the disk a missed positive click gets (`enforce`), bounding boxes."""
from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

from .quality import MaskQuality, interior_point
from .types import Box, Embedding, Mask, Point

__all__ = ["covers", "disagreements", "union", "overlap", "cut", "enforce", "bounding_box", "grown_to",
           "empty_mask"]


def covers(mask: Mask, point: Point) -> bool:
    """Whether the mask holds the click's pixel."""
    height, width = mask.image_size
    x = min(max(int(point.x), 0), width - 1) - mask.x0
    y = min(max(int(point.y), 0), height - 1) - mask.y0
    return 0 <= y < mask.crop.shape[0] and 0 <= x < mask.crop.shape[1] and bool(mask.crop[y, x])


def disagreements(mask: Mask, points: tuple[Point, ...]) -> int:
    """Clicks the mask contradicts: positive ones it misses plus negative ones it covers."""
    return sum(covers(mask, p) != p.positive for p in points)


def union(a: Mask, b: Mask) -> Mask:
    """Both masks' pixels, on a crop spanning both; a's score and signals."""
    if b.area == 0:
        return a
    if a.area == 0:
        return dataclasses.replace(b, score=a.score, quality=a.quality, label=a.label)
    y0, x0 = min(a.y0, b.y0), min(a.x0, b.x0)
    y1 = max(a.y0 + a.crop.shape[0], b.y0 + b.crop.shape[0])
    x1 = max(a.x0 + a.crop.shape[1], b.x0 + b.crop.shape[1])
    crop = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    for m in (a, b):
        crop[m.y0 - y0 : m.y0 - y0 + m.crop.shape[0], m.x0 - x0 : m.x0 - x0 + m.crop.shape[1]] |= m.crop
    return dataclasses.replace(a, crop=crop, x0=x0, y0=y0)


def overlap(a: Mask, b: Mask) -> float:
    """IoU of two masks given as crops."""
    y0, x0 = max(a.y0, b.y0), max(a.x0, b.x0)
    y1 = min(a.y0 + a.crop.shape[0], b.y0 + b.crop.shape[0])
    x1 = min(a.x0 + a.crop.shape[1], b.x0 + b.crop.shape[1])
    both = 0
    if y1 > y0 and x1 > x0:
        both = int((a.crop[y0 - a.y0 : y1 - a.y0, x0 - a.x0 : x1 - a.x0]
                    & b.crop[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0]).sum())
    union = a.area + b.area - both
    return both / union if union else 1.0


def _nearest_is_negative(xs: np.ndarray, ys: np.ndarray, points: tuple[Point, ...]) -> np.ndarray:
    """For pixel centres (xs, ys): whether the nearest click is a negative one (ties go to positive clicks)."""
    def nearest(kind: bool) -> np.ndarray:
        chosen = [p for p in points if p.positive == kind]
        if not chosen:
            return np.full(xs.shape, np.inf)
        return np.min([(xs + 0.5 - p.x) ** 2 + (ys + 0.5 - p.y) ** 2 for p in chosen], axis=0)

    return nearest(False) < nearest(True)


def _anchors(mask: Mask, points: tuple[Point, ...]) -> tuple[Point, ...]:
    """The positive clicks; with none (a box and a negative click), the mask's most interior pixel outside a disk
    around each negative click stands in for them: the part of the box's mask the annotator did not reject."""
    positives = tuple(p for p in points if p.positive)
    if positives or mask.area == 0:
        return positives
    depth = cv2.distanceTransform(np.pad(mask.crop, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    keep = mask.crop.copy()
    ys, xs = np.mgrid[: keep.shape[0], : keep.shape[1]]
    for p in points:
        x, y = int(p.x) - mask.x0, int(p.y) - mask.y0
        if 0 <= y < keep.shape[0] and 0 <= x < keep.shape[1]:
            keep &= (xs + 0.5 - (p.x - mask.x0)) ** 2 + (ys + 0.5 - (p.y - mask.y0)) ** 2 > max(depth[y, x], 1.0) ** 2
    if not keep.any():
        return ()
    x, y, _ = interior_point(keep)
    return (Point(x + mask.x0, y + mask.y0, True),)


def cut(mask: Mask, points: tuple[Point, ...]) -> Mask:
    """The mask without the pixels nearer a negative click than any positive click or `_anchors` stand-in (when a
    negative click is covered)."""
    if not any(not p.positive and covers(mask, p) for p in points):
        return mask
    ys, xs = np.nonzero(mask.crop)
    drop = _nearest_is_negative(xs + mask.x0, ys + mask.y0, points + _anchors(mask, points))
    crop = mask.crop.copy()
    crop[ys[drop], xs[drop]] = False
    return dataclasses.replace(mask, crop=crop)


def _disks(mask: Mask, points: tuple[Point, ...], radius: float) -> Mask:
    """The mask plus a disk of `radius` around each positive click it misses (only pixels nearer that click than
    any negative one)."""
    for point in points:
        if not point.positive or covers(mask, point):
            continue
        height, width = mask.image_size
        r = max(1, math.ceil(radius))
        x0, y0 = max(0, int(point.x) - r), max(0, int(point.y) - r)
        x1, y1 = min(width, int(point.x) + r + 1), min(height, int(point.y) + r + 1)
        ys, xs = np.mgrid[y0:y1, x0:x1]
        inside = (xs + 0.5 - point.x) ** 2 + (ys + 0.5 - point.y) ** 2 <= radius ** 2
        inside &= ~_nearest_is_negative(xs, ys, points)
        inside[min(int(point.y), height - 1) - y0, min(int(point.x), width - 1) - x0] = True
        mask = union(mask, dataclasses.replace(mask, crop=inside, x0=x0, y0=y0))
    return mask


def _clear_around(mask: Mask, points: tuple[Point, ...], radius: float) -> Mask:
    """The mask without the pixels within `radius` of a negative click that lie nearer to it than to any positive
    click: a negative click the mask's edge barely misses still takes its spot out (the editor's click lands a pixel
    or two from where the annotator aimed)."""
    if mask.area == 0 or all(p.positive for p in points):
        return mask
    ys, xs = np.nonzero(mask.crop)
    xs, ys = xs + mask.x0, ys + mask.y0
    near = np.zeros(xs.shape, dtype=bool)
    for p in points:
        if not p.positive:
            near |= (xs + 0.5 - p.x) ** 2 + (ys + 0.5 - p.y) ** 2 <= radius ** 2
    drop = near & _nearest_is_negative(xs, ys, points)
    if not drop.any():
        return mask
    crop = mask.crop.copy()
    crop[ys[drop] - mask.y0, xs[drop] - mask.x0] = False
    return dataclasses.replace(mask, crop=crop)


def enforce(mask: Mask, points: tuple[Point, ...]) -> Mask:
    """The mask made to agree with every click: negative clicks cut (`cut`) and clear their surroundings, missed
    positive ones get a small disk (both: a hundredth of the image's longest side, at least 2 px)."""
    radius = max(2.0, 0.01 * max(mask.image_size))
    return _disks(_clear_around(cut(mask, points), points, radius), points, radius)


def bounding_box(mask: Mask, points: tuple[Point, ...] = (), pad: float = 0.0, label: str | None = None) -> Box:
    """The box around the mask and the given clicks, grown by `pad` of its size on each side."""
    xs, ys = [p.x for p in points], [p.y for p in points]
    if mask.area:
        rows, cols = np.nonzero(mask.crop.any(axis=1))[0], np.nonzero(mask.crop.any(axis=0))[0]
        xs += [mask.x0 + cols[0], mask.x0 + cols[-1] + 1]
        ys += [mask.y0 + rows[0], mask.y0 + rows[-1] + 1]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    dx, dy = pad * (x1 - x0) + 1, pad * (y1 - y0) + 1
    height, width = mask.image_size
    return Box(x0 - dx, y0 - dy, x1 + dx, y1 + dy, label).clipped(width, height)


def grown_to(box: Box, points: tuple[Point, ...]) -> Box:
    """The user's box grown to hold every given click (itself when they are inside)."""
    return Box(min([box.x0] + [p.x for p in points]), min([box.y0] + [p.y for p in points]),
               max([box.x1] + [p.x + 1 for p in points]), max([box.y1] + [p.y + 1 for p in points]), box.label)


def empty_mask(embedding: Embedding, label: str | None) -> Mask:
    return Mask(np.zeros((0, 0), dtype=bool), 0, 0, embedding.original_size, score=0.0, label=label,
                quality=MaskQuality(0.0, 0.0, 0.0, 0.0))
