"""Clicks that do what the annotator means (issue 26), with the standard interactive-segmentation protocol
(`trainer.click_eval`) on both shared datasets' test splits, default model (LiteMedSAM), 2 CPU cores:

- clicks alone: mIoU after 1, 3, 5 clicks, NoC@85 / NoC@90, the share of steps whose mask covers a negative click
  or misses a positive one (every object of the split, an editor session per object: `ClickMemory` on);
- a box (the object's tight box) alone vs the box + one corrective click;
- the scores: Spearman / AUROC of click masks' scores vs their IoU, next to box masks' (issue 27: within 0.05);
- the cost: an interactive call with 1..5 clicks (the editor's case: earlier steps remembered, and the worst case:
  none remembered) vs a warm single-box decode, interleaved in one run.

    python benchmarks/clicks.py [--clicks 5] [--split test] [--datasets dsb2018_nuclei coco_everyday]
                                [--max-objects N] [--parts quality cost] [--out benchmarks/results/clicks.json]

Quality does not depend on the machine's load, cost does: `--parts cost` re-measures the cost alone (on a calm
machine) into an existing result, each part keeping the machine it ran on.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine  # noqa: E402
from trainer.cache import DiskEmbeddings  # noqa: E402
from trainer.click_eval import interior_point, next_click, run_clicks, summarize  # noqa: E402
from trainer.clicks import ClickMemory  # noqa: E402
from trainer.data import load_coco  # noqa: E402
from trainer.finetune import TrainingEmbeddings  # noqa: E402
from trainer.models import load_model  # noqa: E402
from trainer.runtime import Segmenter  # noqa: E402
from trainer.score_metrics import score_report  # noqa: E402
from trainer.types import Point, Prompts  # noqa: E402

TARGETS = {"miou5_minus_miou1": 0.10, "steps_covering_a_negative_click": 0.05, "steps_missing_a_positive_click": 0.05,
           "box_plus_click_minus_box": 0.0, "call_5_clicks_over_single_box": 2.0, "score_spearman_gap": 0.05}
SHARED = REPO.parent / "shared" / "datasets"


def objects(folder: Path, split: str, max_objects: int | None):
    dataset = load_coco(folder)
    images = [im for im in dataset.images if im.split == split]
    count = 0
    for image in images:
        for sample in image.samples:
            if max_objects is not None and count >= max_objects:
                return
            count += 1
            yield image, sample


def quality(segmenter: Segmenter, embeddings: TrainingEmbeddings, folder: Path, split: str, clicks: int,
            max_objects: int | None) -> dict:
    memory = ClickMemory(max_entries=4096)
    click_trials, box_trials, box_scores = [], [], []
    for image, sample in objects(folder, split, max_objects):
        embedding = embeddings.get(image)
        truth = sample.mask
        click_trials.append(run_clicks(segmenter, embedding, truth, image.image_id, clicks, memory=memory))
        box_trials.append(run_clicks(segmenter, embedding, truth, image.image_id, 1, box=sample.box, memory=memory))
        box_scores.append(segmenter.decode(embedding, Prompts(boxes=(sample.box,)))[0].score)
    box_alone = [t.start_iou for t in box_trials]
    box_click = [t.ious[0] for t in box_trials]
    summary = summarize(click_trials, clicks)
    by_image = [t.image_id for t in click_trials]
    click_scores = {f"after_click_{k + 1}": score_report(by_image, [t.scores[k] for t in click_trials],
                                                         [t.ious[k] for t in click_trials]) for k in range(clicks)}
    all_steps = score_report([f"{t.image_id}:{k}" for t in click_trials for k in range(clicks)],
                             [s for t in click_trials for s in t.scores], [v for t in click_trials for v in t.ious])
    box_report = score_report(by_image, box_scores, box_alone)
    return {
        "clicks_alone": summary,
        "box": {"miou_box_alone": round(float(np.mean(box_alone)), 4),
                "miou_box_plus_one_corrective_click": round(float(np.mean(box_click)), 4),
                "corrective_click_positive_share": round(float(np.mean([t.positive[0] for t in box_trials])), 4),
                "objects_worse_after_the_click": int(np.sum(np.array(box_click) < np.array(box_alone) - 1e-9)),
                "steps_disagreeing_with_the_click": round(float(np.mean(
                    [t.missed_positive[0] or t.covered_negative[0] for t in box_trials])), 4)},
        "scores": {"box_masks": pick(box_report), "click_masks_all_steps": pick(all_steps),
                   **{k: pick(v) for k, v in click_scores.items()}},
    }


def pick(report: dict) -> dict:
    keys = ("objects", "mean_score", "mean_iou", "spearman_object", "spearman_task", "auroc_bad", "ece")
    return {k: report.get(k) for k in keys}


def cost(segmenter: Segmenter, embeddings: TrainingEmbeddings, folder: Path, split: str, clicks: int,
         sessions: int) -> dict:
    """Per object of the first `sessions`: the protocol's clicks; then, interleaved: a warm single-box decode, the
    k-click call with steps 1..k-1 remembered (the editor), and with nothing remembered."""
    samples = []
    for image, sample in objects(folder, split, sessions):
        embedding = embeddings.get(image)
        x, y, _ = interior_point(sample.mask)
        points = (Point(x, y, True),)
        while len(points) < clicks:
            mask = segmenter.decode(embedding, Prompts(points=points))[0]
            click = next_click(mask.full(), sample.mask)
            if click is None:
                break
            points = points + (click,)
        samples.append((embedding, sample.box, points))
    times: dict[str, list[float]] = {"single_box": []}
    times.update({f"clicks_{k}_remembered": [] for k in range(1, clicks + 1)})
    times.update({f"clicks_{k}_not_remembered": [] for k in range(1, clicks + 1)})
    for repeat in range(3):
        for n, (embedding, box, points) in enumerate(samples):
            def timed(name: str, fn) -> None:
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)

            timed("single_box", lambda: segmenter.decode(embedding, Prompts(boxes=(box,))))
            memory = ClickMemory()
            history = memory.scope(f"{repeat}:{n}", "cost")
            for k in range(1, len(points) + 1):
                timed(f"clicks_{k}_remembered",
                      lambda: segmenter.decode(embedding, Prompts(points=points[:k]), history=history))
                timed(f"clicks_{k}_not_remembered", lambda: segmenter.decode(embedding, Prompts(points=points[:k])))
    medians = {name: round(1000 * statistics.median(v), 2) for name, v in times.items() if v}
    single = medians["single_box"]
    return {"median_ms": medians, "sessions": len(samples),
            "over_single_box": {name: round(v / single, 3) for name, v in medians.items() if name != "single_box"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--split", default="test")
    parser.add_argument("--datasets", nargs="+", default=["dsb2018_nuclei", "coco_everyday"])
    parser.add_argument("--max-objects", type=int, default=None, help="per dataset (default: every object)")
    parser.add_argument("--cost-sessions", type=int, default=12)
    parser.add_argument("--embeddings", type=Path, default=None, help="a folder to keep image embeddings between runs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "clicks.json")
    parser.add_argument("--parts", nargs="+", choices=("quality", "cost"), default=["quality", "cost"],
                        help="what to measure; a part not measured keeps its entry in an existing --out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.time()
    previous = json.loads(args.out.read_text()) if args.out.exists() and args.parts != ["quality", "cost"] else {}
    result = {"machine": machine(), "targets": TARGETS, "clicks": args.clicks, "split": args.split,
              "datasets": previous.get("datasets", {})}
    segmenter = Segmenter(load_model("lite_medsam"))
    for name in args.datasets:
        folder = SHARED / name
        disk = DiskEmbeddings(args.embeddings) if args.embeddings else None
        embeddings = TrainingEmbeddings(segmenter, disk, max_mb=4096)
        entry = result["datasets"].setdefault(name, {})
        if "quality" in args.parts:
            t0 = time.time()
            entry.update(quality(segmenter, embeddings, folder, args.split, args.clicks, args.max_objects))
            entry["quality_machine"] = {**machine(), "seconds": round(time.time() - t0, 1)}
        if "cost" in args.parts and args.cost_sessions:
            entry["cost"] = {**cost(segmenter, embeddings, folder, args.split, args.clicks, args.cost_sessions),
                             "machine": machine()}
        print(name, json.dumps({"clicks_alone": entry.get("clicks_alone"), "box": entry.get("box"),
                                "cost": entry.get("cost", {}).get("over_single_box")}), flush=True)
    result["seconds"] = round(time.time() - started, 1)
    result["machine_at_end"] = {"loadavg": machine()["loadavg"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
