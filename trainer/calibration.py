"""A monotone map from the score to the IoU it means for one project: isotonic regression fitted on held-out
annotations after a training job, stored in the version's manifest and applied when that version serves."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import isotonic_regression

MIN_OBJECTS = 20  # fewer held-out objects than this: no recalibration (isotonic steps would fit the noise)
MAX_KNOTS = 64


@dataclass(frozen=True)
class Calibration:
    """Piecewise-linear, non-decreasing: a score in [0, 1] -> expected IoU in [0, 1] (knots x -> y).
    A score of 0 (an empty mask) stays 0: a failure, whatever the fit says."""

    x: tuple[float, ...]
    y: tuple[float, ...]

    def __call__(self, score: float) -> float:
        return 0.0 if score <= 0 else float(np.clip(np.interp(score, self.x, self.y), 0.0, 1.0))

    def as_dict(self) -> dict:
        return {"x": [round(v, 5) for v in self.x], "y": [round(v, 5) for v in self.y]}

    @classmethod
    def from_dict(cls, data: object) -> "Calibration | None":
        """The manifest's record, or None when absent or malformed (then scores stay uncalibrated)."""
        if not isinstance(data, dict):
            return None
        x, y = data.get("x"), data.get("y")
        try:
            x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        except (TypeError, ValueError):
            return None
        if x.ndim != 1 or x.shape != y.shape or len(x) < 2 or not np.all(np.isfinite(x) & np.isfinite(y)) \
                or np.any(np.diff(x) <= 0) or np.any(np.diff(y) < 0):
            return None
        return cls(tuple(x.tolist()), tuple(y.tolist()))


def fit_calibration(scores: np.ndarray, ious: np.ndarray) -> Calibration | None:
    """Isotonic regression of IoU on score (both (N,) in [0, 1]); None when there are too few objects."""
    scores, ious = np.asarray(scores, dtype=float), np.asarray(ious, dtype=float)
    if len(scores) < MIN_OBJECTS:
        return None
    order = np.argsort(scores, kind="stable")
    xs, fitted = scores[order], isotonic_regression(ious[order]).x
    # one knot per run of equal fitted values (its score range's ends), at most MAX_KNOTS
    x, y = [0.0], [float(fitted[0])]
    for start in np.flatnonzero(np.r_[True, np.diff(fitted) != 0]):
        end = start + np.argmax(np.r_[fitted[start:] != fitted[start], True]) - 1
        for v in (xs[start], xs[end]):
            if v > x[-1]:
                x.append(float(v))
                y.append(float(fitted[start]))
    if x[-1] < 1.0:
        x.append(1.0)
        y.append(y[-1])
    if len(x) > MAX_KNOTS:
        picks = np.linspace(0, len(x) - 1, MAX_KNOTS).round().astype(int)
        x, y = [x[i] for i in picks], [y[i] for i in picks]
    return Calibration(tuple(x), tuple(y))
