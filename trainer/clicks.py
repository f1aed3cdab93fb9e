"""What clicks mean: positive and negative clicks, alone or refining a box -> one mask, on every model.

The annotator's clicks are replayed in the order they were drawn (Label Studio sends a smart tool's regions in
creation order), each one a step from the previous step's mask:
- a positive click the mask misses says "the object reaches here": the mask grows to cover it;
- a negative click the mask covers says "this is not the object": the mask gives up the part around it;
- a click the mask already agrees with changes nothing.
Every answer covers every positive click and no negative one (`enforce`: a negative click takes the mask pixels
nearer to it than to any positive click; a positive click the model would not cover gets a small disk).

How a step asks the model depends on what the model was trained with:
- `PromptEncoderClicks` (SAM 1 checkpoints, which take clicks): the clicks so far (and the box) go to the prompt
  encoder with the previous step's low-res logits as the mask prompt, as segment-anything's interactive loop does;
  a lone first click takes the best of SAM's three multimask outputs.
- `BoxSearchClicks` (box-only models such as LiteMedSAM, whose prompt encoder never learnt clicks): each step tries
  box prompts -- boxes of several sizes around a click, the mask's box grown to a positive click or cut at a
  negative one -- and keeps the candidate that agrees with the most clicks, then the highest predicted IoU. The
  candidates run on `ImageTokens.window` (the decoder on the grid cells around each box only), so a step costs
  about one whole-image decode.
`ClickMemory` keeps recent steps, so an editor session that adds one click per call computes one step per call.
Measured with the standard protocol (clicks at the most interior point of the largest error) in
`benchmarks/clicks.py`.
"""
from __future__ import annotations

import dataclasses
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import cv2
import numpy as np
import torch
from segment_anything.modeling import MaskDecoder

from .decoder import UPSCALE, ImageTokens, LowResMask, decode_multimask, decode_windows, prepare_image, window_logits
from .quality import MaskQuality, expected_iou, interior_point, largest_part
from .types import Box, Embedding, Mask, Point, Prompts

if TYPE_CHECKING:
    from .calibration import Calibration
    from .runtime import Segmenter

__all__ = ["ClickMemory", "ClickHistory", "BoxSearchClicks", "PromptEncoderClicks", "covers", "enforce"]


# -- masks as crops: the few operations clicks need ------------------------------------------------------------
def covers(mask: Mask, point: Point) -> bool:
    """Whether the mask holds the click's pixel."""
    height, width = mask.image_size
    x = min(max(int(point.x), 0), width - 1) - mask.x0
    y = min(max(int(point.y), 0), height - 1) - mask.y0
    return 0 <= y < mask.crop.shape[0] and 0 <= x < mask.crop.shape[1] and bool(mask.crop[y, x])


def disagreements(mask: Mask, points: tuple[Point, ...]) -> int:
    """Clicks the mask contradicts: positive ones it misses plus negative ones it covers."""
    return sum(covers(mask, p) != p.positive for p in points)


def _union(a: Mask, b: Mask) -> Mask:
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


def _cut(mask: Mask, points: tuple[Point, ...]) -> Mask:
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
        mask = _union(mask, dataclasses.replace(mask, crop=inside, x0=x0, y0=y0))
    return mask


def enforce(mask: Mask, points: tuple[Point, ...]) -> Mask:
    """The mask made to agree with every click: negative clicks cut (`_cut`), missed positive ones get a small disk
    (a hundredth of the image's longest side, at least 2 px)."""
    radius = max(2.0, 0.01 * max(mask.image_size))
    return _disks(_cut(mask, points), points, radius)


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


def _grown_to(box: Box, points: tuple[Point, ...]) -> Box:
    """The user's box grown to hold every given click (itself when they are inside)."""
    return Box(min([box.x0] + [p.x for p in points]), min([box.y0] + [p.y for p in points]),
               max([box.x1] + [p.x + 1 for p in points]), max([box.y1] + [p.y + 1 for p in points]), box.label)


def empty_mask(embedding: Embedding, label: str | None) -> Mask:
    return Mask(np.zeros((0, 0), dtype=bool), 0, 0, embedding.original_size, score=0.0, label=label,
                quality=MaskQuality(0.0, 0.0, 0.0, 0.0))


# -- the memory of recent steps ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClickStep:
    """One step's result: the mask, and for models that take clicks the low-res logits (1, 1, 4h, 4w) the next step
    feeds back as its mask prompt."""

    mask: Mask
    low_res: torch.Tensor | None = None


class ClickMemory:
    """The most recent steps of interactive sessions: (image, decoder version, prompts so far) -> ClickStep.

    Thread-safe, bounded by entry count (a step holds a mask crop and at most 256 KB of logits)."""

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._steps: OrderedDict[tuple, ClickStep] = OrderedDict()
        self._lock = threading.Lock()

    def scope(self, image_key: str, version: str) -> "ClickHistory":
        return ClickHistory(self, (image_key, version))

    def get(self, key: tuple) -> ClickStep | None:
        with self._lock:
            step = self._steps.get(key)
            if step is not None:
                self._steps.move_to_end(key)
            return step

    def put(self, key: tuple, step: ClickStep) -> None:
        with self._lock:
            self._steps[key] = step
            self._steps.move_to_end(key)
            while len(self._steps) > self.max_entries:
                self._steps.popitem(last=False)


@dataclass(frozen=True)
class ClickHistory:
    """ClickMemory seen from one image and decoder version."""

    memory: ClickMemory
    scope: tuple

    def get(self, box: Box | None, points: tuple[Point, ...]) -> ClickStep | None:
        return self.memory.get((*self.scope, box, points))

    def put(self, box: Box | None, points: tuple[Point, ...], step: ClickStep) -> None:
        self.memory.put((*self.scope, box, points), step)


# -- the two ways of asking a model --------------------------------------------------------------------------------
class ClickStrategy:
    """Replays the clicks step by step from the longest prefix the history holds; subclasses say how a step asks
    the model. `decode` answers one mask that agrees with every click, scored like a box's mask."""

    def __init__(self, segmenter: "Segmenter", embedding: Embedding, decoder: MaskDecoder,
                 history: ClickHistory | None) -> None:
        self.segmenter = segmenter
        self.embedding = embedding
        self.decoder = decoder
        self.history = history
        self._image: ImageTokens | None = None

    @property
    def image(self) -> ImageTokens:
        """The per-image decoder work, computed once per call and only when a step needs it."""
        if self._image is None:
            self._image = prepare_image(self.decoder, self.segmenter.model.sam.prompt_encoder, self.embedding.features)
        return self._image

    def decode(self, prompts: Prompts, calibration: "Calibration | None") -> Mask:
        box = prompts.boxes[0] if prompts.boxes else None
        points = prompts.points
        label = next((p.label for p in reversed(points) if p.label), None) or (box.label if box else None)
        done, step = self._resume(box, points)
        while done < len(points):
            done += 1
            step = self.step(box, points[:done], step)
            if self.history is not None:
                self.history.put(box, points[:done], step)
        mask = enforce(step.mask, points)
        return self._scored(mask, label, calibration)

    def _resume(self, box: Box | None, points: tuple[Point, ...]) -> tuple[int, ClickStep]:
        """How many clicks the longest remembered prefix holds, and its step (the start when none)."""
        if self.history is not None:
            for done in range(len(points), -1, -1):
                step = self.history.get(box, points[:done])
                if step is not None:
                    return done, step
        step = self.start(box)
        if self.history is not None:
            self.history.put(box, (), step)
        return 0, step

    def _scored(self, mask: Mask, label: str | None, calibration: "Calibration | None") -> Mask:
        """The mask's score from the signals of the decode it came from, its connectedness re-measured after the
        clicks' edits; box fill does not apply (a click's search box is ours, not the object's)."""
        quality = mask.quality or MaskQuality(0.0, 0.0, 0.0, 0.0)
        quality = dataclasses.replace(quality, box_fill=1.0, largest_part=largest_part(mask.crop))
        score = expected_iou(quality) if mask.area else 0.0
        return dataclasses.replace(mask, label=label, quality=quality,
                                   score=calibration(score) if calibration is not None and mask.area else score)

    # subclasses
    def start(self, box: Box | None) -> ClickStep:
        raise NotImplementedError

    def step(self, box: Box | None, points: tuple[Point, ...], previous: ClickStep) -> ClickStep:
        raise NotImplementedError


class BoxSearchClicks(ClickStrategy):
    """Clicks on a model that only learnt boxes: each step chooses among box prompts (see the module doc)."""

    SEARCH_FRACTIONS = (0.03, 0.06, 0.12, 0.25, 0.5)  # square boxes around a click, of the image's longest side
    GROW_PADS = (0.0, 0.1)  # the mask's box grown to a missed positive click, padded by these shares

    def start(self, box: Box | None) -> ClickStep:
        if box is None:
            return ClickStep(empty_mask(self.embedding, None))
        return ClickStep(self._decode_box(box, exact=True))

    CHOICE = "closest"
    AROUND_LIMIT = True
    AROUND = "best"

    def step(self, box: Box | None, points: tuple[Point, ...], previous: ClickStep) -> ClickStep:
        click, mask = points[-1], previous.mask
        if covers(mask, click) == click.positive:
            return previous
        positives = tuple(p for p in points if p.positive)
        negatives = tuple(p for p in points if not p.positive)
        limit = None if box is None else _grown_to(box, positives)
        if click.positive and mask.area == 0:
            return ClickStep(self._best([mask, *self._search(click, limit)], points))
        if click.positive:
            # the object reaches the click: the mask's box grown to it, or the mask plus what lies around the click
            grown = [bounding_box(mask, positives, pad) for pad in self.GROW_PADS] if box is None else (
                [limit] if limit != box else [])
            candidates = [self._decode_box(b) for b in grown]
            around_limit = limit if limit is not None or not self.AROUND_LIMIT else bounding_box(mask, positives, 0.1)
            around = [_union(mask, m) for m in self._search(click, around_limit)]
            if self.AROUND == "closest":
                candidates.append(self._closest(mask, around, negatives + (click,)))
            else:
                candidates.append(_union(mask, self._best(self._search(click, around_limit), negatives + (click,))))
        else:
            candidates = [self._decode_box(b) for b in self._cut_boxes(mask, points)] + [_cut(mask, points)]
        return ClickStep(self._closest(mask, candidates, points))

    def _closest(self, mask: Mask, candidates: list[Mask], points: tuple[Point, ...]) -> Mask:
        if self.CHOICE == "looks":
            return self._best([mask, *candidates], points)
        def looks(m: Mask) -> float:
            q = m.quality
            return q.predicted_iou * q.stability * q.largest_part if q else 0.0
        def key(m: Mask):
            near = overlap(m, mask)
            return (disagreements(m, points), -(near if self.CHOICE == "closest" else near * looks(m)))
        return min(candidates, key=key)

    def _search(self, click: Point, limit: Box | None) -> list[Mask]:
        """Masks of square boxes of several sizes around the click (inside `limit`, the user's box, when given)."""
        height, width = self.embedding.original_size
        boxes = []
        for fraction in self.SEARCH_FRACTIONS:
            r = fraction * max(height, width) / 2
            b = Box(click.x - r, click.y - r, click.x + r, click.y + r).clipped(width, height)
            if limit is not None:
                b = Box(max(b.x0, limit.x0), max(b.y0, limit.y0), min(b.x1, limit.x1), min(b.y1, limit.y1))
            if not b.is_empty and b not in boxes:
                boxes.append(b)
        return [self._decode_box(b) for b in boxes]

    @staticmethod
    def _cut_boxes(mask: Mask, points: tuple[Point, ...]) -> list[Box]:
        """The mask's box with one side moved to just past the negative click, where every positive click stays in."""
        click = points[-1]
        box = bounding_box(mask)
        sides = {"x0": click.x + 1, "x1": click.x - 1, "y0": click.y + 1, "y1": click.y - 1}
        boxes = [dataclasses.replace(box, **{side: value}) for side, value in sides.items()]
        return [b for b in boxes if not b.is_empty and b.x0 < b.x1 and b.y0 < b.y1
                and all(b.x0 <= p.x < b.x1 and b.y0 <= p.y < b.y1 for p in points if p.positive)]

    @staticmethod
    def _best(candidates: list[Mask], points: tuple[Point, ...]) -> Mask:
        """The candidate that contradicts the fewest clicks, then looks best: predicted IoU x stability x its largest
        part's share (on 168 everyday-photo objects' first clicks this picks masks of mean IoU 0.376 where the
        predicted IoU alone picks 0.372 and the best candidate would give 0.57: LiteMedSAM's IoU head is weak on
        photos)."""
        def looks(m: Mask) -> float:
            q = m.quality
            return q.predicted_iou * q.stability * q.largest_part if q else 0.0

        return min(candidates, key=lambda m: (disagreements(m, points), -looks(m)))

    def _decode_box(self, box: Box, exact: bool = False) -> Mask:
        """One box prompt's mask: on the window's cells only (`ImageTokens.window`) unless `exact`."""
        segmenter = self.segmenter
        window = segmenter.grid_window(self.embedding, box, ())
        sparse = segmenter.prompt_embedding(self.embedding, box, ())
        if exact:
            (low_res,) = decode_windows(self.decoder, self.image, sparse, [window])
        else:
            gy0, gx0, gy1, gx1 = window
            logits, iou = window_logits(self.decoder, self.image.window(window), sparse,
                                        [(0, 0, gy1 - gy0, gx1 - gx0)])
            low_res = LowResMask(logits[0], gy0 * UPSCALE, gx0 * UPSCALE, float(iou[0]))
        return segmenter.to_original(self.embedding, low_res, box, (), None)


class PromptEncoderClicks(ClickStrategy):
    """Clicks on a model that takes them: segment-anything's interactive loop (see the module doc)."""

    def start(self, box: Box | None) -> ClickStep:
        if box is None:
            return ClickStep(empty_mask(self.embedding, None))
        return self._decode(box, (), None)

    def step(self, box: Box | None, points: tuple[Point, ...], previous: ClickStep) -> ClickStep:
        if box is None and len(points) == 1:
            return self._decode(None, points, None, multimask=True)
        return self._decode(box, points, previous.low_res)

    def _decode(self, box: Box | None, points: tuple[Point, ...], mask_input: torch.Tensor | None,
                multimask: bool = False) -> ClickStep:
        segmenter = self.segmenter
        height, width = self.embedding.features.shape[-2:]
        whole = (0, 0, height, width)  # the next step's mask prompt needs the logits of the whole frame
        image = self.image if mask_input is None else prepare_image(
            self.decoder, segmenter.model.sam.prompt_encoder, self.embedding.features, mask_input)
        sparse = segmenter.prompt_embedding(self.embedding, box, points)
        if multimask:
            low_res = max(decode_multimask(self.decoder, image, sparse, whole), key=lambda m: m.iou)
        else:
            (low_res,) = decode_windows(self.decoder, image, sparse, [whole])
        mask = segmenter.to_original(self.embedding, low_res, box, points, None)
        return ClickStep(mask, low_res.logits[None, None])


STRATEGIES: dict[bool, Callable[..., ClickStrategy]] = {True: BoxSearchClicks, False: PromptEncoderClicks}
