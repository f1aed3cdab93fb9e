"""What a small project gets from its held-out annotations (issue 27, item 3), on both shared datasets:

- splits: for projects of 5, 10 and 20 annotated images (random draws from the dataset's train + val images,
  split as a Label Studio project is: `assign_splits`, then `held_out_sets`), how many images and objects go to
  training, early stopping and the gate, and how often the gate can promote at all (trainer/evidence.py);
- one training job per size (`train_and_register`, the served defaults): promoted or not and why, the gate's
  gain and its bound, against the gain the version really has on the dataset's untouched test split;
- the minimums: the per-object IoU differences of those versions on the test images, made gain-free (minus
  their mean, a random sign per image), give gate sets of k images drawn at random; the share a rule would
  promote is its false-promotion rate (nominal 5 %), for the paired bootstrap over images (the rule) and over
  single objects; with the real differences, the share promoted is the rule's power at that gate size.

    python benchmarks/small_projects.py [--sizes 5 10 20] [--epochs 8] [--draws 50] [--out ...]

The six training jobs (8 epochs each) take most of its time: 62 min on the 2-core development machine while
other work kept its load average at 4-7 (results/small_projects.json: wall_s, loadavg); --epochs and --sizes
shorten it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine  # noqa: E402
from trainer import evidence  # noqa: E402
from trainer.cache import DiskEmbeddings  # noqa: E402
from trainer.data import Dataset, ImageSamples, assign_splits, dataset_summary, held_out_sets, load_coco  # noqa: E402
from trainer.finetune import FineTuneConfig, TrainingEmbeddings, evaluate_objects, train_and_register  # noqa: E402
from trainer.models import load_model  # noqa: E402
from trainer.registry import Registry  # noqa: E402
from trainer.runtime import Segmenter  # noqa: E402

DATASETS = {"dsb2018_nuclei": REPO.parent / "shared/datasets/dsb2018_nuclei",
            "coco_everyday": REPO.parent / "shared/datasets/coco_everyday"}
GATE_IMAGES = range(1, 9)  # gate sizes simulated
TRIALS = 400


def project(pool: list[ImageSamples], size: int, rng: np.random.Generator, before: bool = False) -> Dataset:
    """`size` images of the pool, split as a Label Studio project's are (before: as they were before issue 27,
    a fifth by id hash, at least one)."""
    chosen = [ImageSamples(pool[k].image_id, pool[k].load_image, pool[k].samples)
              for k in rng.choice(len(pool), size, replace=False)]
    assign_splits(chosen, **({"min_val_objects": 0, "min_val_images": 0} if before else {}))
    return Dataset(chosen, dataset_summary(chosen, "small-project"))


def split_sizes(data: Dataset, before: bool = False) -> dict:
    early, gate = held_out_sets(data.images, *((0, 1, 0) if before else (
        evidence.MIN_GATE_OBJECTS, evidence.MIN_GATE_IMAGES, evidence.GATE_IMAGES_WANTED)))
    count = lambda images: {"images": len(images), "objects": sum(len(i.samples) for i in images)}  # noqa: E731
    return {"train": count(data.split("train")), "early_stop": count(early), "gate": count(gate),
            "gate_can_promote": len(gate) >= evidence.MIN_GATE_IMAGES
            and count(gate)["objects"] >= evidence.MIN_GATE_OBJECTS}


def summarise_splits(draws: list[dict]) -> dict:
    out = {}
    for part in ("train", "early_stop", "gate"):
        for what in ("images", "objects"):
            values = [d[part][what] for d in draws]
            out[f"{part}_{what}"] = {"min": int(min(values)), "median": float(np.median(values)),
                                     "max": int(max(values))}
    out["gate_can_promote"] = round(float(np.mean([d["gate_can_promote"] for d in draws])), 3)
    out["early_stop_empty"] = round(float(np.mean([d["early_stop"]["images"] == 0 for d in draws])), 3)
    return out


def by_image(images: list[ImageSamples], new: list, base: list) -> list[list[float]]:
    """Per test image, its objects' IoU differences (new - base)."""
    differences: dict[str, list[float]] = {}
    for n, b in zip(new, base):
        differences.setdefault(n.image_id, []).append(n.iou - b.iou)
    return [differences[i.image_id] for i in images if i.image_id in differences]


def percentile_bootstrap(values: np.ndarray, groups: np.ndarray | None, confidence: float = 0.95,
                         resamples: int = 1000, seed: int = 0) -> float:
    """The alternatives to the rule's bound: a percentile bootstrap of the mean resampling whole groups
    (images) or, with None, single values (objects)."""
    rng = np.random.default_rng(seed)
    if groups is None:
        means = values[rng.integers(0, values.size, (resamples, values.size))].mean(axis=1)
    else:
        _, index = np.unique(groups, return_inverse=True)
        sums, counts = np.bincount(index, weights=values), np.bincount(index).astype(float)
        picks = rng.integers(0, sums.size, (resamples, sums.size))
        means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    return float(np.quantile(means, 1.0 - confidence))


OBJECT_BUCKETS = ((1, 9), (10, 19), (20, 39), (40, 10**6))


def simulate_gates(pools: list[list[list[float]]], rng: np.random.Generator, gain_free: bool,
                   margin: float) -> dict:
    """Gate sets of k images drawn (with replacement) from one version's test images, each image with all its
    objects' IoU differences; gain_free: each image's differences minus the version's mean gain, with a random
    sign per image (no gain, the real spread within and between images). The share of gates whose lower bound
    (95 %) is above `margin`: the rule's (t over images) and two percentile bootstraps (over images, over
    objects), by gate images and, for the rule with at least MIN_GATE_IMAGES images, by gate objects."""
    rows, by_objects = [], {bucket: [0, 0] for bucket in OBJECT_BUCKETS}
    for k in GATE_IMAGES:
        hits = {"t_over_images": 0, "bootstrap_over_images": 0, "bootstrap_over_objects": 0}
        objects = []
        for trial in range(TRIALS):
            pool = pools[trial % len(pools)]
            mean = float(np.mean([d for image in pool for d in image])) if gain_free else 0.0
            picks = rng.integers(0, len(pool), k)
            signs = rng.choice([-1.0, 1.0], k) if gain_free else np.ones(k)
            values = np.array([sign * (d - mean) for p, sign in zip(picks, signs) for d in pool[p]])
            groups = np.array([slot for slot, p in enumerate(picks) for _ in pool[p]])
            objects.append(values.size)
            promoted = evidence.gain_lower_bound(values, groups) > margin
            hits["t_over_images"] += promoted
            hits["bootstrap_over_images"] += percentile_bootstrap(values, groups, seed=trial) > margin
            hits["bootstrap_over_objects"] += percentile_bootstrap(values, None, seed=trial) > margin
            if k >= evidence.MIN_GATE_IMAGES:
                bucket = next(b for b in OBJECT_BUCKETS if b[0] <= values.size <= b[1])
                by_objects[bucket][0] += promoted
                by_objects[bucket][1] += 1
        rows.append({"gate_images": k, "objects_median": float(np.median(objects)),
                     **{name: round(count / TRIALS, 3) for name, count in hits.items()}})
    return {"by_gate_images": rows,
            "rule_by_gate_objects": [{"objects": f"{low}-{high}" if high < 10**6 else f"{low}+", "gates": n,
                                      "promoted": round(hit / n, 3) if n else None}
                                     for (low, high), (hit, n) in by_objects.items()]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--epochs", type=int, default=FineTuneConfig.epochs)
    parser.add_argument("--draws", type=int, default=50, help="random projects per size for the split counts")
    parser.add_argument("--test-objects-per-image", type=int, default=15,
                        help="objects evaluated per test image (the simulated gates draw whole test images)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/small_projects.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    result = {"machine": machine(), "min_gate_objects": evidence.MIN_GATE_OBJECTS,
              "min_gate_images": evidence.MIN_GATE_IMAGES, "confidence": evidence.CONFIDENCE,
              "epochs": args.epochs, "datasets": {}}
    segmenter = Segmenter(load_model("lite_medsam"))
    for name, path in DATASETS.items():
        full = load_coco(path)
        pool = full.split("train") + full.split("val")
        test = [ImageSamples(i.image_id, i.load_image, i.samples[:args.test_objects_per_image], "test")
                for i in full.split("test")]
        rng = np.random.default_rng(0)
        entry = {"pool_images": len(pool), "test_images": len(test), "sizes": {}}
        differences = []
        with tempfile.TemporaryDirectory() as model_dir:
            embeddings = TrainingEmbeddings(segmenter, DiskEmbeddings(Path(model_dir) / "embeddings"))
            base = evaluate_objects(segmenter, embeddings, test)
            for size in args.sizes:
                seeds = rng.integers(0, 2**31, args.draws)
                draws = [split_sizes(project(pool, size, np.random.default_rng(seed))) for seed in seeds]
                before = [split_sizes(project(pool, size, np.random.default_rng(seed), True), True)
                          for seed in seeds]
                data = project(pool, size, np.random.default_rng(size))
                config = FineTuneConfig(epochs=args.epochs)
                job_began = time.perf_counter()
                report = train_and_register(segmenter, data, Registry(model_dir, f"p{size}"), model_dir, config,
                                            progress=False)
                state = Registry(model_dir, f"p{size}").load_decoder(report["version"])
                new = evaluate_objects(segmenter, embeddings, test, segmenter.fine_tuned_decoder(state))
                per_image = by_image(test, new, base)
                differences.append(per_image)
                flat = np.array([d for image in per_image for d in image])
                groups = np.array([i for i, image in enumerate(per_image) for _ in image])
                entry["sizes"][size] = {
                    "splits_over_draws": summarise_splits(draws), "splits_before": summarise_splits(before),
                    "job_splits": split_sizes(data),
                    "job": {k: report[k] for k in ("promoted", "reason", "gate_miou_current", "gate_miou_new",
                                                   "gate_gain", "gate_gain_lower", "gate_images", "gate_objects",
                                                   "early_stop_images", "best_epoch", "epochs_run", "seconds")},
                    "job_wall_s": round(time.perf_counter() - job_began, 1),
                    "test_gain": round(float(flat.mean()), 4), "test_objects": int(flat.size),
                    "test_gain_lower": round(evidence.gain_lower_bound(flat, groups), 4)}
                print(name, size, json.dumps(entry["sizes"][size]["job"]), "test gain",
                      entry["sizes"][size]["test_gain"], flush=True)
        margin = FineTuneConfig.margin
        entry["gain_free_gates"] = simulate_gates(differences, np.random.default_rng(1), True, 0.0)
        entry["real_gain_gates"] = simulate_gates(differences, np.random.default_rng(2), False, margin)
        result["datasets"][name] = entry
    result["machine"]["loadavg_end"] = machine()["loadavg"]
    result["wall_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({n: d["gain_free_gates"]["by_gate_images"] for n, d in result["datasets"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
