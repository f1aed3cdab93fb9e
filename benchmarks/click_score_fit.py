"""Fits `trainer.quality.CLICK_SCORE_WEIGHTS`, the score of click-only masks (issue 27), on both shared datasets'
fit split (val: the test split stays for `benchmarks/clicks.py`, which reports the result).

Every object of the split (nuclei: `--per-image` objects of each image, drawn with a fixed seed) runs the standard
protocol (`trainer.click_eval`) for 5 clicks; each step gives the box-style score of its signals, its agreement with
its own box's mask, the number of clicks and the true IoU. Least squares of IoU on expit(w . features), each dataset
weighing the same (photos have fewer objects than nuclei), gives the weights; reported next to them: per dataset,
Spearman with IoU of the box-style score and of the fitted score, pooled over steps and per step.

    python benchmarks/click_score_fit.py [--split val] [--per-image 10] [--out benchmarks/results/click_score_fit.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares
from scipy.special import expit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine  # noqa: E402
from trainer.click_eval import run_clicks  # noqa: E402
from trainer.clicks import ClickMemory  # noqa: E402
from trainer.data import load_coco  # noqa: E402
from trainer.finetune import TrainingEmbeddings  # noqa: E402
from trainer.models import load_model  # noqa: E402
from trainer.quality import click_score_features, expected_iou  # noqa: E402
from trainer.runtime import Segmenter  # noqa: E402
from trainer.score_metrics import spearman  # noqa: E402

SHARED = REPO.parent / "shared" / "datasets"
DATASETS = ("dsb2018_nuclei", "coco_everyday")
CLICKS = 5


def steps(segmenter: Segmenter, folder: Path, split: str, per_image: int) -> list[dict]:
    """One row per protocol step of every chosen object: features (4,), clicks, IoU, box-style score."""
    embeddings = TrainingEmbeddings(segmenter, None, max_mb=4096)
    memory = ClickMemory(max_entries=4096)
    rng = np.random.default_rng(0)
    rows = []
    for image in [im for im in load_coco(folder).images if im.split == split]:
        embedding = embeddings.get(image)
        for n in sorted(rng.permutation(len(image.samples))[:per_image].tolist()):
            truth = image.samples[n].mask
            trial = run_clicks(segmenter, embedding, truth, f"{image.image_id}:{n}", CLICKS, memory=memory)
            for k, (quality, iou) in enumerate(zip(trial.qualities, trial.ious), start=1):
                score = expected_iou(quality) if quality is not None else 0.0
                if score > 0:  # an empty mask scores 0 whatever the weights
                    rows.append({"features": click_score_features(score, quality.agreement, k).tolist(),
                                 "clicks": k, "iou": iou, "box_style": score})
    return rows


def fit(rows: dict[str, list[dict]]) -> np.ndarray:
    x = np.concatenate([np.array([r["features"] for r in v]) for v in rows.values()])
    y = np.concatenate([np.array([r["iou"] for r in v]) for v in rows.values()])
    weight = np.concatenate([np.full(len(v), 1 / np.sqrt(len(v))) for v in rows.values()])  # datasets alike
    return least_squares(lambda w: weight * (expit(x @ w) - y), np.zeros(x.shape[1])).x


def report(rows: list[dict], weights: np.ndarray) -> dict:
    fitted = expit(np.array([r["features"] for r in rows]) @ weights)
    box_style, ious, clicks = (np.array([r[k] for r in rows]) for k in ("box_style", "iou", "clicks"))
    return {"steps": len(rows),
            "spearman_box_style": spearman(box_style, ious), "spearman_fitted": spearman(fitted, ious),
            "per_click": {str(k): {"box_style": spearman(box_style[clicks == k], ious[clicks == k]),
                                   "fitted": spearman(fitted[clicks == k], ious[clicks == k])}
                          for k in range(1, CLICKS + 1)},
            "mean_iou": round(float(ious.mean()), 4), "mean_fitted": round(float(fitted.mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default="val")
    parser.add_argument("--per-image", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "click_score_fit.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.time()
    segmenter = Segmenter(load_model("lite_medsam"))
    rows = {name: steps(segmenter, SHARED / name, args.split, args.per_image) for name in DATASETS}
    weights = fit(rows)
    result = {"machine": machine(), "split": args.split, "per_image": args.per_image, "clicks": CLICKS,
              "weights": [round(float(w), 4) for w in weights],
              "features": ["1", "logit(box-style score)", "logit(agreement)", "log(clicks)"],
              "datasets": {name: report(v, weights) for name, v in rows.items()},
              "seconds": round(time.time() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("weights", "datasets")}, indent=1))


if __name__ == "__main__":
    main()
