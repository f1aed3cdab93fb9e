"""Does the score find the bad masks? (issue 19) On dsb2018 nuclei, held-out splits, LiteMedSAM:

- base model: the raw predicted IoU (what was served before) vs the expected-IoU score, on val + test;
- after a training job (`train_and_register`, the gated registry write with its gate split and recalibration):
  the gate set's metrics as the manifest records them, and the untouched test split scored with the new
  version's calibrated score, its uncalibrated score and its raw predicted IoU;
- the serving cost: a warm 10-box decode with the quality signals vs the same decode with them stubbed out.

    python benchmarks/score_quality.py [--epochs 4] [--out benchmarks/results/score_quality.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, round_robin  # noqa: E402
from trainer import runtime  # noqa: E402
from trainer.cache import DiskEmbeddings  # noqa: E402
from trainer.calibration import Calibration  # noqa: E402
from trainer.data import load_coco  # noqa: E402
from trainer.finetune import FineTuneConfig, ObjectResult, TrainingEmbeddings, evaluate_objects, train_and_register  # noqa: E402
from trainer.models import load_model  # noqa: E402
from trainer.quality import MaskQuality  # noqa: E402
from trainer.registry import Registry  # noqa: E402
from trainer.score_metrics import score_report  # noqa: E402
from trainer.types import Prompts  # noqa: E402

TARGETS = {"spearman_object": 0.75, "spearman_task": 0.75, "auroc_bad": 0.9, "ece_after_training": 0.08,
           "serving_overhead": 0.05}


def report(objects: list[ObjectResult], score=lambda o: o.score) -> dict:
    return score_report([o.image_id for o in objects], [score(o) for o in objects], [o.iou for o in objects])


def raw_predicted_iou(o: ObjectResult) -> float:
    """What the backend served before issue 19: SAM's IoU head, clamped; an empty mask 0."""
    return 0.0 if o.quality.stability <= 0 else min(1.0, max(0.0, o.quality.predicted_iou))


CANDIDATES = {  # the formulas compared when choosing trainer.quality.expected_iou (from the same signals)
    "raw_predicted_iou": raw_predicted_iou,
    "stability": lambda o: o.quality.stability,
    "predicted_iou_x_stability": lambda o: min(1.0, max(0.0, o.quality.predicted_iou)) * o.quality.stability,
    "issue_first_try": lambda o: min(1.0, max(0.0, o.quality.predicted_iou * o.quality.stability
                                               * min(o.quality.box_fill / 0.6, 1.0))),
    "served_expected_iou": lambda o: o.score,
}


def candidates(objects: list[ObjectResult]) -> dict:
    """Spearman per object and AUROC for bad masks of each candidate formula."""
    out = {}
    for name, score in CANDIDATES.items():
        r = report(objects, score)
        out[name] = {"spearman_object": r["spearman_object"], "spearman_task": r["spearman_task"],
                     "auroc_bad": r["auroc_bad"]}
    return out


def serving_cost(segmenter, embeddings, image, repeat: int) -> dict:
    """A warm decode of 10 boxes, with the quality signals and with them replaced by a constant."""
    embedding = embeddings.get(image)
    prompts = Prompts(boxes=tuple(s.box for s in image.samples[:10]))
    measured = runtime.measure_quality
    constant = MaskQuality(0.9, 1.0, 1.0, 1.0)

    def without() -> None:
        runtime.measure_quality = lambda *args: constant
        try:
            segmenter.decode(embedding, prompts)
        finally:
            runtime.measure_quality = measured

    times = round_robin({"with_quality": lambda: segmenter.decode(embedding, prompts), "without": without}, repeat)
    ratio = times["with_quality"]["median_s"] / times["without"]["median_s"]
    return {"boxes": len(prompts.boxes), **times, "ratio": round(ratio, 4), "overhead": round(ratio - 1, 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared/datasets/dsb2018_nuclei"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--embeddings", help="an embedding disk-cache folder to reuse (default: a fresh one; the "
                                             "measured scores do not depend on it)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/score_quality.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    began = time.perf_counter()
    started_machine = machine()
    segmenter = runtime.Segmenter(load_model("lite_medsam"))
    data = load_coco(args.data)
    with tempfile.TemporaryDirectory() as model_dir:
        if args.embeddings:
            (Path(model_dir) / "embeddings").symlink_to(Path(args.embeddings).resolve())
        embeddings = TrainingEmbeddings(segmenter, DiskEmbeddings(Path(model_dir) / "embeddings"))
        held_out = data.split("val") + data.split("test")
        base = evaluate_objects(segmenter, embeddings, held_out)
        registry = Registry(model_dir, "bench")
        config = FineTuneConfig(epochs=args.epochs, margin=-1.0)  # promoted whatever it gains: the score is measured
        trained = train_and_register(segmenter, data, registry, model_dir, config, progress=False)
        version = trained["version"]
        manifest = registry.manifest(version)
        calibration = Calibration.from_dict(manifest.get("calibration"))
        decoder = segmenter.fine_tuned_decoder(registry.load_decoder(version))
        test_new = evaluate_objects(segmenter, embeddings, data.split("test"), decoder)
        test_base = [o for o in base if o.image_id in {i.image_id for i in data.split("test")}]
        cost = serving_cost(segmenter, embeddings, data.split("test")[0], args.repeat)
    calibrated = [replace(o, score=calibration(o.score)) for o in test_new] if calibration else test_new
    result = {
        "benchmark": "score_quality", "data": Path(args.data).name, "model": "lite_medsam",
        "machine": started_machine, "machine_after": machine(), "targets": TARGETS,
        "base": {"held_out": "val + test splits",
                 "raw_predicted_iou": report(base, raw_predicted_iou), "expected_iou": report(base),
                 "test_split": {"raw_predicted_iou": report(test_base, raw_predicted_iou),
                                "expected_iou": report(test_base)}},
        "after_training": {
            "epochs": args.epochs, "version": version, "calibrated": calibration is not None,
            "gate_images": trained["gate_images"], "early_stop_images": trained["early_stop_images"],
            "gate_miou_current": trained["gate_miou_current"], "gate_miou_new": trained["gate_miou_new"],
            "gate_score": trained["gate_score"], "gate_score_uncalibrated": trained["gate_score_uncalibrated"],
            "test_split": {"raw_predicted_iou": report(test_new, raw_predicted_iou),
                           "expected_iou_uncalibrated": report(test_new), "expected_iou_calibrated": report(calibrated)}},
        "candidates": {"base_val_test": candidates(base), "after_training_test": candidates(test_new)},
        "serving_cost": cost, "seconds": round(time.perf_counter() - began, 1),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"base_test": result["base"]["test_split"]["expected_iou"],
                      "trained_test": result["after_training"]["test_split"]["expected_iou_calibrated"],
                      "overhead": cost["overhead"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
