"""The standard interactive-segmentation protocol (RITM, SimpleClick, SAM's evaluations), on our runtime.

The first click is positive at the object's most interior point; each next click goes to the most interior point of
the largest error region -- positive where the mask misses the object, negative where it spills over. After each
click: the mask's IoU with the object, whether it covers a negative click or misses a positive one, its score.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .clicks import ClickMemory, covers
from .quality import MaskQuality, interior_point
from .types import Box, Embedding, Mask, Point, Prompts

__all__ = ["interior_point", "next_click", "iou", "ClickTrial", "run_clicks", "summarize"]


def next_click(predicted: np.ndarray, truth: np.ndarray) -> Point | None:
    """The protocol's next click for bool (H, W) masks: at the most interior point of the larger error (missed
    object pixels -> positive, spilled background -> negative); None when the mask is exact."""
    missed, spilled = truth & ~predicted, predicted & ~truth
    fx, fy, fd = interior_point(missed) if missed.any() else (0.0, 0.0, 0.0)
    sx, sy, sd = interior_point(spilled) if spilled.any() else (0.0, 0.0, 0.0)
    if fd == 0 and sd == 0:
        return None
    return Point(fx, fy, True) if fd >= sd else Point(sx, sy, False)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return float((a & b).sum() / union) if union else 1.0


@dataclass
class ClickTrial:
    """One object's session: after click k (k = 1..n) its IoU, score, seconds, and whether the mask disagreed with
    any click so far."""

    image_id: str
    area: int
    start_iou: float | None = None  # the box's own mask, before any click
    ious: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    qualities: list[MaskQuality | None] = field(default_factory=list)  # the signals each score came from
    seconds: list[float] = field(default_factory=list)
    missed_positive: list[bool] = field(default_factory=list)
    covered_negative: list[bool] = field(default_factory=list)
    positive: list[bool] = field(default_factory=list)  # the kind of each click


def run_clicks(segmenter, embedding: Embedding, truth: np.ndarray, image_id: str, clicks: int,
               box: Box | None = None, memory: ClickMemory | None = None, scope: str = "") -> ClickTrial:
    """Up to `clicks` protocol clicks on one object (after `box` when given, whose own mask decides the first
    click), each an interactive call with every click so far; `memory` plays the editor session's history."""
    trial = ClickTrial(image_id, int(truth.sum()))
    history = memory.scope(f"{scope}:{image_id}:{trial.area}:{box}", "eval") if memory is not None else None
    points: tuple[Point, ...] = ()
    mask: Mask | None = None
    if box is not None:
        mask = segmenter.decode(embedding, Prompts(boxes=(box,)))[0]
        trial.start_iou = iou(mask.full(), truth)
    else:
        x, y, _ = interior_point(truth)
        points = (Point(x, y, True),)
    while True:
        if points:
            started = time.perf_counter()
            mask = segmenter.decode(embedding, Prompts(boxes=(box,) if box else (), points=points), history=history)[0]
            trial.seconds.append(time.perf_counter() - started)
            full = mask.full()
            trial.ious.append(iou(full, truth))
            trial.scores.append(float(mask.score))
            trial.qualities.append(mask.quality)
            trial.missed_positive.append(any(p.positive and not covers(mask, p) for p in points))
            trial.covered_negative.append(any(not p.positive and covers(mask, p) for p in points))
        if len(points) >= clicks:
            return trial
        click = next_click(mask.full(), truth)
        if click is None:  # exact: later clicks change nothing
            for values in (trial.ious, trial.scores, trial.qualities, trial.missed_positive, trial.covered_negative):
                values.extend(values[-1:] * (clicks - len(points)))
            return trial
        points = points + (click,)
        trial.positive.append(click.positive)


def summarize(trials: list[ClickTrial], clicks: int) -> dict:
    """mIoU after each click, NoC@85/90 (clicks to reach that IoU; clicks + 1 when never), the share of steps whose
    mask covers a negative click / misses a positive one, median seconds per call."""
    ious = np.array([t.ious for t in trials])

    def noc(threshold: float) -> float:
        return float(np.mean([next((k + 1 for k, v in enumerate(row) if v >= threshold), clicks + 1) for row in ious]))

    steps = [(m, c) for t in trials for m, c in zip(t.missed_positive, t.covered_negative)]
    seconds = [s for t in trials for s in t.seconds]
    return {
        "objects": len(trials),
        "miou_after_click": [round(float(v), 4) for v in ious.mean(axis=0)],
        "noc85": round(noc(0.85), 3), "noc90": round(noc(0.90), 3),
        "steps": len(steps),
        "steps_covering_a_negative_click": round(float(np.mean([c for _, c in steps])), 4) if steps else 0.0,
        "steps_missing_a_positive_click": round(float(np.mean([m for m, _ in steps])), 4) if steps else 0.0,
        "negative_clicks": sum(not p for t in trials for p in t.positive),
        "positive_clicks": sum(p for t in trials for p in t.positive),
        "median_ms_per_call": round(1000 * float(np.median(seconds)), 1) if seconds else None,
    }
