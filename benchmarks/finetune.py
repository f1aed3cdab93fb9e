"""Decoder fine-tuning on dsb2018 nuclei: test mIoU of base, fine-tuned (dice-bce, dice-focal) and seed-mse.

    python benchmarks/finetune.py [--data ../shared/datasets/dsb2018_nuclei] [--out benchmarks/results/finetune.json]

Writes the JSON (with machine info) and a PNG of the per-epoch curves next to it. A fresh model dir is used, so
the default fine-tune's wall time includes encoding every train/val image once (a cold start). What caching the
embeddings saves per epoch is measured by benchmarks/caching.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine  # noqa: E402
from trainer.cache import DiskEmbeddings  # noqa: E402
from trainer.data import ImageSamples, load_coco  # noqa: E402
from trainer.finetune import FineTuneConfig, TrainingEmbeddings, evaluate, train_and_register  # noqa: E402
from trainer.models import load_model  # noqa: E402
from trainer.registry import Registry  # noqa: E402
from trainer.runtime import Segmenter  # noqa: E402

TARGET_GAIN_POINTS = 8.0
TARGET_SECONDS = 600.0


def test_eval(segmenter: Segmenter, embeddings: TrainingEmbeddings, images: list[ImageSamples],
              registry: Registry | None, version: str | None) -> dict:
    decoder = segmenter.fine_tuned_decoder(registry.load_decoder(version)) if version else None
    began = time.perf_counter()
    result = evaluate(segmenter, embeddings, images, decoder)
    return {**result, "version": version or "base", "seconds": round(time.perf_counter() - began, 1)}


def plot(curves: dict[str, list[dict]], base: float, path: Path) -> None:
    """Val mIoU per epoch for each run (epoch 0 = the starting decoder), drawn with Pillow."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 720, 420, 70, 170, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    values = [base] + [c["val_miou"] for runs in curves.values() for c in runs if c["val_miou"] is not None]
    epochs = max([len(runs) for runs in curves.values()] + [1])
    low, high = min(values) - 0.01, max(values) + 0.01
    sx = lambda e: left + (width - left - right) * e / epochs
    sy = lambda v: top + (height - top - bottom) * (high - v) / (high - low)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(6):
        v = low + (high - low) * i / 5
        draw.line([left - 4, sy(v), left, sy(v)], fill="black")
        draw.text((8, sy(v) - 6), f"{v:.3f}", fill="black")
    for e in range(epochs + 1):
        draw.text((sx(e) - 3, height - bottom + 6), str(e), fill="black")
    draw.text((left, 12), "dsb2018 val mIoU per epoch (box prompts, LiteMedSAM decoder)", fill="black")
    draw.text(((width - right) // 2, height - 22), "epoch", fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for k, (name, runs) in enumerate(curves.items()):
        points = [(sx(0), sy(base))] + [(sx(c["epoch"]), sy(c["val_miou"])) for c in runs if c["val_miou"] is not None]
        draw.line(points, fill=colours[k % 4], width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[k % 4])
        draw.line([width - right + 12, top + 20 * k + 8, width - right + 36, top + 20 * k + 8], fill=colours[k % 4], width=3)
        draw.text((width - right + 42, top + 20 * k + 2), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "dsb2018_nuclei"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "finetune.json"))
    parser.add_argument("--model-dir", default=None, help="default: a fresh temporary folder (cold start)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = {"machine": machine()}
    model_dir = Path(args.model_dir or tempfile.mkdtemp(prefix="finetune-bench-"))
    dataset = load_coco(args.data)
    segmenter = Segmenter(load_model("lite_medsam"))
    config = FineTuneConfig()
    report.update(dataset=dataset.summary, model=segmenter.model.identity, config=asdict(config),
                  model_dir=str(model_dir))

    began = time.perf_counter()
    registry = Registry(model_dir, "bench")
    tuned = train_and_register(segmenter, dataset, registry, model_dir, config, progress=False)
    tuned["wall_seconds"] = round(time.perf_counter() - began, 1)
    report["fine_tune"] = tuned

    embeddings = TrainingEmbeddings(segmenter, DiskEmbeddings(model_dir / "embeddings"))
    test = dataset.split("test")
    report["test"] = {"base": test_eval(segmenter, embeddings, test, None, None),
                      "fine_tuned": test_eval(segmenter, embeddings, test, registry, tuned["version"])}

    for loss in ("dice-focal", "seed-mse"):  # the optional focal loss, and the popular recipe as a baseline
        other = Registry(model_dir, f"bench-{loss}")
        began = time.perf_counter()
        run = train_and_register(segmenter, dataset, other, model_dir, FineTuneConfig(loss=loss), progress=False)
        run["wall_seconds"] = round(time.perf_counter() - began, 1)
        name = loss.replace("-", "_")
        report[name] = run
        report["test"][name] = test_eval(segmenter, embeddings, test, other, run["version"])

    base = report["test"]["base"]["miou"]
    report["test_gain_points"] = {name: round(100 * (r["miou"] - base), 2) for name, r in report["test"].items()}
    report["test_gain_points_by_size"] = {
        name: {size: (round(100 * (g["miou"] - report["test"]["base"]["by_size"][size]["miou"]), 2)
                      if g["miou"] is not None else None) for size, g in r["by_size"].items()}
        for name, r in report["test"].items()}

    write(report, Path(args.out))


def write(report: dict, out: Path) -> None:
    tuned = report["fine_tune"]
    report["targets"] = {"gain_points_min": TARGET_GAIN_POINTS, "fine_tune_seconds_max": TARGET_SECONDS,
                         "gain_met": report["test_gain_points"]["fine_tuned"] >= TARGET_GAIN_POINTS,
                         "small_objects_not_worse": report["test_gain_points_by_size"]["fine_tuned"]["small"] >= 0,
                         "time_met": tuned["wall_seconds"] <= TARGET_SECONDS}
    report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    plot({"dice-bce (default)": tuned["curves"], "dice-focal": report["dice_focal"]["curves"],
          "seed-mse (popular recipe)": report["seed_mse"]["curves"]},
         tuned["val_miou_base"], out.with_name("finetune_curves.png"))
    print(json.dumps({"test_miou": {k: v["miou"] for k, v in report["test"].items()},
                      "gain_points": report["test_gain_points"], "fine_tune_s": tuned["wall_seconds"],
                      "targets": report["targets"]}))


if __name__ == "__main__":
    main()
