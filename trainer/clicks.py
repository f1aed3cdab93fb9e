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
  negative one -- and keeps the candidate that agrees with the most clicks, then (a first click) the one that looks
  best or (a later click) the one that changes the mask least. The candidates run on `ImageTokens.window` (the
  decoder on the grid cells around each box only), so a step costs about one whole-image decode.
`ClickMemory` keeps recent steps, so an editor session that adds one click per call computes one step per call.
Measured with the standard protocol (clicks at the most interior point of the largest error) in
`benchmarks/clicks.py`.
"""
from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from segment_anything.modeling import MaskDecoder

from .decoder import UPSCALE, ImageTokens, LowResMask, decode_multimask, decode_windows, prepare_image, window_logits
from .mask_edits import bounding_box, covers, cut, disagreements, empty_mask, enforce, grown_to, overlap, union
from .quality import MaskQuality, click_expected_iou, expected_iou, largest_part, own_box_fill
from .types import Box, Embedding, Mask, Point, Prompts

if TYPE_CHECKING:
    from .calibration import Calibration
    from .runtime import Segmenter

__all__ = ["ClickMemory", "ClickHistory", "BoxSearchClicks", "PromptEncoderClicks", "covers", "enforce"]


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
        return self._scored(mask, label, calibration, clicks=0 if box is not None else len(points))

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

    def _scored(self, mask: Mask, label: str | None, calibration: "Calibration | None", clicks: int) -> Mask:
        """The mask's score from the signals of the decode it came from, its connectedness re-measured after the
        clicks' edits and its box fill taken against its own bounding box (no box of the annotator's says how big
        the object is; a mask that fills little of its own box spills or frays: on the val splits this raises
        the click masks' Spearman with IoU from 0.16-0.54 to 0.23-0.68 per click on photos, 0.45-0.54 to
        0.52-0.68 on nuclei). A mask of `clicks` > 0 clicks and no box is scored by `click_expected_iou`, which
        also weighs its agreement with its own box's mask (one more window decode) and the number of clicks."""
        quality = mask.quality or MaskQuality(0.0, 0.0, 0.0, 0.0)
        quality = dataclasses.replace(quality, box_fill=own_box_fill(mask.crop), largest_part=largest_part(mask.crop))
        if not mask.area:
            score = 0.0
        elif clicks:
            quality = dataclasses.replace(quality, agreement=overlap(mask, self._decode_box(bounding_box(mask))))
            score = click_expected_iou(quality, clicks)
        else:
            score = expected_iou(quality)
        return dataclasses.replace(mask, label=label, quality=quality,
                                   score=calibration(score) if calibration is not None and mask.area else score)

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

    def step(self, box: Box | None, points: tuple[Point, ...], previous: ClickStep) -> ClickStep:
        click, mask = points[-1], previous.mask
        if covers(mask, click) == click.positive:
            return previous
        positives = tuple(p for p in points if p.positive)
        negatives = tuple(p for p in points if not p.positive)
        limit = None if box is None else grown_to(box, positives)
        if click.positive and mask.area == 0:
            return ClickStep(self._best([mask, *self._search(click, limit)], points))
        if click.positive:
            # the object reaches the click: the mask's box grown to it, or the mask plus what lies around the click
            # (searched within the user's box, or near the mask: a far search box finds another object)
            grown = [bounding_box(mask, positives, pad) for pad in self.GROW_PADS] if box is None else (
                [limit] if limit != box else [])
            around = self._search(click, limit if limit is not None else bounding_box(mask, positives, 0.1))
            candidates = [self._decode_box(b) for b in grown] + [union(mask, self._best(around, negatives + (click,)))]
        else:
            candidates = [self._decode_box(b) for b in self._cut_boxes(mask, points)] + [cut(mask, points)]
        return ClickStep(self._closest(mask, candidates, points))

    @staticmethod
    def _closest(mask: Mask, candidates: list[Mask], points: tuple[Point, ...]) -> Mask:
        """The candidate that contradicts the fewest clicks, then changes the mask least (IoU with it): a later
        click corrects, it does not start over (choosing the best-looking candidate instead took a box + one
        corrective click from 0.738 down to 0.511 on the nuclei test split, in an earlier version)."""
        return min(candidates, key=lambda m: (disagreements(m, points), -overlap(m, mask)))

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
