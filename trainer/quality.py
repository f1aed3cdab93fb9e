"""How good is a predicted mask? Signals measured on the decoder's output, the score that combines them into an
expected IoU in [0, 1], and a per-version monotone recalibration fitted on a project's held-out annotations.

Serving and evaluation compute the same `MaskQuality` (in `Segmenter.decode`), so what `eval` measures is what
Label Studio shows.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from scipy.special import expit, logit

STABILITY_OFFSET = 1.0  # logits thresholded at +-1, as SAM's automatic mask generator does
FULL_BOX_FILL = 0.6  # a mask that fills at least this share of its box is not penalised for filling too little


@dataclass(frozen=True)
class MaskQuality:
    """Signals of one mask's quality, each in [0, 1] (higher = better) except predicted_iou (SAM's raw output).

    predicted_iou: the decoder's IoU head; stability: area(logits > 1) / area(logits > -1); box_fill: the mask's
    share of its box's area (1 without a box); largest_part: the largest connected part's share of the mask;
    agreement (click-only masks): IoU of the mask with the mask its own bounding box gets as a box prompt (1 for
    masks of a box prompt).
    """

    predicted_iou: float
    stability: float
    box_fill: float
    largest_part: float
    agreement: float = 1.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(float(v), 4) for k, v in self.__dict__.items()}


def measure_quality(logits: torch.Tensor, mask: np.ndarray, predicted_iou: float,
                    box_area: float | None) -> MaskQuality:
    """logits: float (h, w) mask logits on the crop; mask: bool (h, w) = logits > 0; box_area: the prompt box's
    area in the same pixels (None: no box)."""
    area = int(mask.sum())
    if area == 0:
        return MaskQuality(float(predicted_iou), 0.0, 0.0, 0.0)
    high = int((logits > STABILITY_OFFSET).sum())
    low = int((logits > -STABILITY_OFFSET).sum())
    fill = 1.0 if not box_area else min(1.0, area / box_area)
    return MaskQuality(float(predicted_iou), high / max(low, 1), fill, largest_part(mask))


def largest_part(mask: np.ndarray) -> float:
    """The largest 8-connected part's share of a bool (h, w) mask's pixels (0 for an empty mask)."""
    area = int(mask.sum())
    if area == 0:
        return 0.0
    count, _, stats, _ = cv2.connectedComponentsWithStats(np.ascontiguousarray(mask).view(np.uint8), connectivity=8)
    return int(stats[1:, cv2.CC_STAT_AREA].max()) / area if count > 1 else 1.0


def own_box_fill(mask: np.ndarray) -> float:
    """A bool (h, w) mask's share of its own bounding box (0 for an empty mask)."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if len(rows) == 0:
        return 0.0
    return float(mask.sum()) / float((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1))


def expected_iou(quality: MaskQuality) -> float:
    """The uncalibrated score in [0, 1]: the predicted IoU (square root: the head is the least reliable signal)
    discounted by the mask's instability, by filling too little of its box and by falling apart into pieces;
    an empty mask scores 0. Chosen on dsb2018 (benchmarks/score_quality.py): the raw predicted IoU ranks masks
    by true IoU with Spearman 0.62, this 0.76 on the test split; its exponents were not tuned further there."""
    if quality.stability <= 0 or quality.predicted_iou <= 0:
        return 0.0
    fill = min(quality.box_fill / FULL_BOX_FILL, 1.0)
    score = np.sqrt(quality.predicted_iou) * quality.stability * fill * quality.largest_part
    return float(min(1.0, max(0.0, score)))


# Click-only masks: logistic weights (bias, logit of the box-style score, logit of the agreement, log of the clicks),
# fitted by least squares on IoU over the protocol's steps on both shared datasets' fit splits
# (benchmarks/click_score_fit.py, benchmarks/results/click_score_fit.json).
CLICK_SCORE_WEIGHTS = (-1.7848, 0.4542, 0.5065, 1.1433)
_EPS = 1e-3


def click_expected_iou(quality: MaskQuality, clicks: int) -> float:
    """The score of a mask made by `clicks` clicks and no box: the box-style score (`expected_iou`, box fill taken
    against the mask's own box) combined with how well a box prompt of the mask's own box reproduces it and with
    how many clicks made it (on both datasets a mask after more clicks is better on average: the protocol's first
    click is ambiguous -- part or whole -- and later clicks correct it). An empty mask scores 0."""
    score = expected_iou(quality)
    if score <= 0 or clicks < 1:
        return 0.0
    return float(expit(np.dot(CLICK_SCORE_WEIGHTS, click_score_features(score, quality.agreement, clicks))))


def click_score_features(score: float, agreement: float, clicks: int) -> np.ndarray:
    """The (4,) inputs `CLICK_SCORE_WEIGHTS` weigh: 1, logit(score), logit(agreement), log(clicks)."""
    score, agreement = np.clip([score, agreement], _EPS, 1 - _EPS)
    return np.array([1.0, logit(score), logit(agreement), np.log(clicks)])


def task_score(scores: list[float]) -> float:
    """A task's score (Label Studio's Data Manager sorts by it) from its masks' scores, an empty mask's being 0:
    their mean. Measured against ordering by the worst mask (benchmarks/score_quality.py): the mean ranks tasks
    by their mean true IoU better and finds their bad masks about as soon."""
    return float(np.mean(scores)) if scores else 0.0


def interior_point(region: np.ndarray) -> tuple[float, float, float]:
    """The most interior pixel of a bool (H, W) region: (x, y) of its centre and its distance to the region's edge
    (the image border counts as edge)."""
    padded = np.pad(region, 1).astype(np.uint8)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return x + 0.5, y + 0.5, float(distance[y, x])
