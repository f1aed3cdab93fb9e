"""Does the score find the bad masks? Rank and calibration metrics of scores against true IoUs, per object and
per task (an image with all its objects: what Label Studio's Data Manager sorts)."""
from __future__ import annotations

import numpy as np
from scipy.stats import mannwhitneyu, spearmanr

from .quality import task_score

BAD_IOU = 0.5  # a mask below this IoU needs fixing
SHARES = (0.1, 0.2, 0.3)


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return round(float(spearmanr(a, b).statistic), 4)


def expected_calibration_error(scores: np.ndarray, ious: np.ndarray, bins: int = 10) -> float | None:
    """Mean |score - IoU| gap over equal-width score bins, weighted by the bin's share of objects."""
    if len(scores) == 0:
        return None
    index = np.minimum((scores * bins).astype(int), bins - 1)
    gap = sum(abs(scores[index == b].mean() - ious[index == b].mean()) * np.sum(index == b)
              for b in range(bins) if np.any(index == b))
    return round(float(gap / len(scores)), 4)


def auroc_bad(scores: np.ndarray, ious: np.ndarray) -> float | None:
    """How well the score tells good masks from bad ones (IoU < BAD_IOU): P(good scores above bad)."""
    good, bad = scores[ious >= BAD_IOU], scores[ious < BAD_IOU]
    if len(good) == 0 or len(bad) == 0:
        return None
    return round(float(mannwhitneyu(good, bad).statistic / (len(good) * len(bad))), 4)


def bad_found(order_scores: np.ndarray, bad_counts: np.ndarray) -> dict[str, float | None]:
    """The share of all bad masks inside the lowest-scored 10/20/30% of the units (objects or tasks)."""
    total = bad_counts.sum()
    order = np.argsort(order_scores, kind="stable")
    return {f"lowest_{int(share * 100)}pct": (round(float(bad_counts[order[: int(round(share * len(order)))]].sum()
                                                          / total), 4) if total else None) for share in SHARES}


def score_report(tasks: list[str], scores: list[float], ious: list[float]) -> dict:
    """Per object: its task id, score and true IoU -> Spearman (object, task), ECE, AUROC, bad masks found first.

    A task's true quality is its mean IoU; its score is `task_score` (the mean; also reported: ordering tasks by
    their worst mask's score).
    """
    tasks_a, scores_a, ious_a = np.asarray(tasks), np.asarray(scores, dtype=float), np.asarray(ious, dtype=float)
    if len(scores_a) == 0:
        return {"objects": 0}
    names = list(dict.fromkeys(tasks))
    by_task = [tasks_a == name for name in names]
    served = np.array([task_score(scores_a[m].tolist()) for m in by_task])
    worst = np.array([scores_a[m].min() for m in by_task])
    mean_iou = np.array([ious_a[m].mean() for m in by_task])
    bad_per_task = np.array([np.sum(ious_a[m] < BAD_IOU) for m in by_task])
    return {
        "objects": len(scores_a), "tasks": len(names), "bad_masks": int(np.sum(ious_a < BAD_IOU)),
        "mean_score": round(float(scores_a.mean()), 4), "mean_iou": round(float(ious_a.mean()), 4),
        "spearman_object": spearman(scores_a, ious_a), "spearman_task": spearman(served, mean_iou),
        "spearman_task_worst_score": spearman(worst, mean_iou),
        "ece": expected_calibration_error(scores_a, ious_a), "auroc_bad": auroc_bad(scores_a, ious_a),
        "bad_found_objects": bad_found(scores_a, (ious_a < BAD_IOU).astype(int)),
        "bad_found_tasks": bad_found(served, bad_per_task),
        "bad_found_tasks_worst_score": bad_found(worst, bad_per_task),
    }
