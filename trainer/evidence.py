"""Whether a gate set's gain is evidence: enough objects and images, and a gain that holds under the set's noise.

A new decoder and the served one are both scored on the same gate objects, so the gain is paired: one IoU
difference per object, and the gate's gain is their mean. Objects of one image share its stain, scale and
clutter, so they are not independent evidence: the noise of the mean is measured between images. The lower
one-sided confidence bound of the gain is the cluster-robust one (images are the clusters): the mean minus
Student's t quantile with (images - 1) degrees of freedom times its standard error, the error computed from
the images' summed differences around the mean with the k / (k - 1) small-sample factor. A version is
promoted only when
- the gate holds at least MIN_GATE_OBJECTS objects on at least MIN_GATE_IMAGES images, and
- the lower bound (95 %) of its gain exceeds the margin (PROMOTION_MARGIN).
A negative margin asks for a promotion whatever the gate says (tests and benchmarks that measure a version).

Why this bound and where the minimums come from: benchmarks/small_projects.py (results/small_projects.json)
fine-tunes small projects on both shared datasets and, from those versions' per-object IoU differences on the
datasets' test images made gain-free, draws gate sets of 1 to 8 images and counts how often a rule promotes a
version that gains nothing (nominal: 5 %). A percentile bootstrap that resamples single objects (the obvious
choice) ignores that objects of an image move together and promoted such versions far more often; resampling
whole images did better but still too often with the few images a small project has; the t bound stays near
the nominal rate from MIN_GATE_IMAGES images and MIN_GATE_OBJECTS objects on (figures in README.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_GATE_IMAGES = 3  # fewer: the bound promotes gain-free versions more often than 5 % (small_projects.json)
MIN_GATE_OBJECTS = 20  # fewer: likewise, on the everyday photos (small_projects.json)
GATE_IMAGES_WANTED = 5  # a small project's gate gets this many when it can: the bound then finds most real gains
CONFIDENCE = 0.95  # one-sided


@dataclass(frozen=True)
class GateEvidence:
    """The gate's paired comparison: objects and images it holds, the mean gain (new - current mIoU) and the
    lower bound of the gain at `confidence` (`gain_lower_bound`)."""

    objects: int
    images: int
    gain: float
    gain_lower: float
    confidence: float

    def as_dict(self) -> dict:
        def number(value: float) -> float | None:  # JSON has no NaN / -inf: none measured
            return round(value, 5) if np.isfinite(value) else None

        return {"gate_gain": number(self.gain), "gate_gain_lower": number(self.gain_lower),
                "gate_confidence": self.confidence}


def gain_lower_bound(differences: np.ndarray, images: np.ndarray, confidence: float = CONFIDENCE) -> float:
    """The one-sided lower confidence bound of the mean of `differences` (n,), objects clustered by `images`
    (n,): cluster-robust standard error with the k / (k - 1) factor, Student's t with k - 1 degrees of
    freedom (k images). -inf with fewer than two images (no spread between images to measure)."""
    from scipy.stats import t

    differences = np.asarray(differences, dtype=float)
    _, index = np.unique(np.asarray(images), return_inverse=True)
    sums = np.bincount(index, weights=differences)
    counts = np.bincount(index).astype(float)
    k = sums.size
    if k < 2:
        return float("-inf")
    mean = sums.sum() / counts.sum()
    error = np.sqrt(k / (k - 1) * np.sum((sums - counts * mean) ** 2)) / counts.sum()
    return float(mean - t.ppf(confidence, k - 1) * error)


def measure(new_ious: list[float], current_ious: list[float], image_ids: list[str],
            confidence: float = CONFIDENCE) -> GateEvidence:
    """The paired evidence of one gate set: per object its IoU with the new and the current decoder, its image."""
    differences = np.asarray(new_ious, dtype=float) - np.asarray(current_ious, dtype=float)
    if differences.size == 0:
        return GateEvidence(0, 0, float("nan"), float("nan"), confidence)
    return GateEvidence(int(differences.size), len(set(image_ids)), float(differences.mean()),
                        gain_lower_bound(differences, np.asarray(image_ids), confidence), confidence)


def promotion_decision(evidence: GateEvidence, margin: float, current_name: str,
                       min_objects: int = MIN_GATE_OBJECTS, min_images: int = MIN_GATE_IMAGES) -> tuple[bool, str]:
    """(promote?, the reason in words). A negative margin promotes whatever the gate holds (at least one
    object): an explicit request to ship regardless of evidence."""
    if evidence.objects == 0:
        return False, "no gate images (held-out annotations): cannot compare with the served model, not promoted"
    bound = f"{evidence.gain_lower:+.4f}" if np.isfinite(evidence.gain_lower) else "unknown (one image)"
    gain = (f"gate mIoU gain over {current_name} {evidence.gain:+.4f}, at least {bound} with "
            f"{evidence.confidence:.0%} confidence ({evidence.objects} objects on {evidence.images} gate images)")
    if margin < 0:
        return True, f"{gain}; promoted whatever it gains (margin {margin})"
    if not evidence.gain > margin:
        return False, f"{gain}: does not beat {current_name} by the margin {margin}; kept, not promoted"
    if evidence.objects < min_objects or evidence.images < min_images:
        return False, (f"too little evidence: the gate set has {evidence.objects} objects on {evidence.images} "
                       f"images, a promotion needs at least {min_objects} objects on {min_images} images "
                       f"({gain}); kept, not promoted: annotate more images")
    if evidence.gain_lower > margin:
        return True, f"{gain} > margin {margin}: promoted"
    return False, f"{gain}: within the gate set's noise (not above the margin {margin}); kept, not promoted"
