"""Decoder fine-tuning on dsb2018 nuclei: test mIoU of base / fine-tuned / seed-mse, and what caching saves.

    python benchmarks/finetune.py [--data ../shared/datasets/dsb2018_nuclei] [--out benchmarks/results/finetune.json]

Writes the JSON (with machine info) and a PNG of the per-epoch curves next to it. A fresh model dir is used, so
the default fine-tune's time includes encoding every train/val image once (a cold start).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainer.cache import DiskEmbeddings  # noqa: E402
from trainer.data import Dataset, ImageSamples, load_coco  # noqa: E402
from trainer.cache import image_key  # noqa: E402
from trainer.finetune import (FineTuneConfig, TrainingEmbeddings, epoch_plan, evaluate, fine_tune,  # noqa: E402
                              jitter, sample_loss, train_and_register, trainable_copy)
from trainer.models import load_model  # noqa: E402
from trainer.registry import Registry  # noqa: E402
from trainer.runtime import Segmenter  # noqa: E402

TARGET_GAIN_POINTS = 8.0
TARGET_SECONDS = 600.0


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def test_eval(segmenter: Segmenter, embeddings: TrainingEmbeddings, images: list[ImageSamples],
              registry: Registry | None, version: str | None) -> dict:
    decoder = segmenter.fine_tuned_decoder(registry.load_decoder(version)) if version else None
    began = time.perf_counter()
    result = evaluate(segmenter, embeddings, images, decoder)
    return {**result, "version": version or "base", "seconds": round(time.perf_counter() - began, 1)}


def epoch_seconds(segmenter: Segmenter, dataset: Dataset, embeddings: TrainingEmbeddings, config: FineTuneConfig) -> float:
    """One training epoch (no validation) over the train split."""
    train = Dataset([ImageSamples(i.image_id, i.load_image, i.samples, "train") for i in dataset.split("train")])
    single = FineTuneConfig(**{**asdict(config), "epochs": 1})
    return fine_tune(segmenter, train, embeddings, single, progress=False).curves[0]["seconds"]


def interleaved_timing(segmenter: Segmenter, dataset: Dataset, disk: DiskEmbeddings, config: FineTuneConfig) -> dict:
    """Per image of one epoch's plan, in turn: read the cached embedding, re-encode the image, one training step,
    and decode the val objects. Interleaving exposes both epoch variants to the same machine load.
    """
    decoder = trainable_copy(segmenter.model.sam.mask_decoder)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    rng = np.random.default_rng(0)
    load = encode = step = 0.0
    for image, picks in epoch_plan(dataset.split("train"), config, 1):
        pixels = image.load_image()
        began = time.perf_counter()
        embedding = disk.get(image_key(segmenter.encoder_identity, pixels))
        load += time.perf_counter() - began
        began = time.perf_counter()
        segmenter.embed(image.load_image())
        encode += time.perf_counter() - began
        samples = [image.samples[i] for i in picks]
        began = time.perf_counter()
        boxes = [jitter(s.box, rng, config.box_jitter, *embedding.original_size[::-1]) for s in samples]
        loss = sample_loss(segmenter, decoder, embedding, samples, boxes, config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += time.perf_counter() - began
    val = dataset.split("val")
    began = time.perf_counter()
    n_val = evaluate(segmenter, TrainingEmbeddings(segmenter, disk), val, None)["n_objects"]
    val_s = time.perf_counter() - began
    images = len(dataset.split("train"))
    return {"train_images": images, "cached_epoch_s": round(load + step, 1), "recompute_epoch_s": round(encode + step, 1),
            "speedup": round((encode + step) / (load + step), 2), "encode_s_per_image": round(encode / images, 3),
            "cached_read_s_per_image": round(load / images, 4), "train_step_s_per_image": round(step / images, 3),
            "val_eval_s": round(val_s, 1), "val_objects": n_val,
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


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
    parser.add_argument("--skip-recompute", action="store_true", help="skip the epoch that re-encodes every image")
    parser.add_argument("--timing-only", action="store_true",
                        help="only redo the interleaved timings of an earlier run (its JSON and model dir)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.timing_only:
        return timing_only(args)
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

    seed_registry = Registry(model_dir, "bench-seed-mse")
    seed_config = FineTuneConfig(loss="seed-mse")
    began = time.perf_counter()
    seed = train_and_register(segmenter, dataset, seed_registry, model_dir, seed_config, progress=False)
    seed["wall_seconds"] = round(time.perf_counter() - began, 1)
    report["seed_mse"] = seed
    report["test"]["seed_mse"] = test_eval(segmenter, embeddings, test, seed_registry, seed["version"])

    base = report["test"]["base"]["miou"]
    report["test_gain_points"] = {name: round(100 * (r["miou"] - base), 2) for name, r in report["test"].items()}
    report["test_gain_points_by_size"] = {
        name: {size: (round(100 * (g["miou"] - report["test"]["base"]["by_size"][size]["miou"]), 2)
                      if g["miou"] is not None else None) for size, g in r["by_size"].items()}
        for name, r in report["test"].items()}

    cached = epoch_seconds(segmenter, dataset, embeddings, config)
    timing = {"train_images": len(dataset.split("train")), "cached_embeddings_s": cached}
    if not args.skip_recompute:
        recompute = TrainingEmbeddings(segmenter, None, recompute=True)
        timing["recompute_encoder_s"] = epoch_seconds(segmenter, dataset, recompute, config)
        timing["speedup"] = round(timing["recompute_encoder_s"] / cached, 2)
    report["epoch_time"] = timing
    write(add_timing(report, segmenter, dataset, model_dir, config), Path(args.out))


def add_timing(report: dict, segmenter: Segmenter, dataset: Dataset, model_dir: Path, config: FineTuneConfig) -> dict:
    """Interleaved unit timings, and from them the default fine-tune's time on this machine at that moment."""
    unit = interleaved_timing(segmenter, dataset, DiskEmbeddings(model_dir / "embeddings"), config)
    epochs = report["fine_tune"]["epochs_run"]
    images = len(dataset.split("train")) + len(dataset.split("val"))
    unit["default_fine_tune_estimate_s"] = round(images * unit["encode_s_per_image"] + epochs * unit["cached_epoch_s"]
                                                 + (epochs + 1) * unit["val_eval_s"], 1)
    unit["estimate_formula"] = ("(train+val images) x encode + epochs_run x cached epoch + (epochs_run + 1) x val eval"
                                " (cold start, as train_and_register runs it)")
    report["epoch_time_interleaved"] = unit
    return report


def write(report: dict, out: Path) -> None:
    tuned = report["fine_tune"]
    estimate = report["epoch_time_interleaved"]["default_fine_tune_estimate_s"]
    report["targets"] = {"gain_points_min": TARGET_GAIN_POINTS, "fine_tune_seconds_max": TARGET_SECONDS,
                         "gain_met": report["test_gain_points"]["fine_tuned"] >= TARGET_GAIN_POINTS,
                         "time_met_measured": tuned["wall_seconds"] <= TARGET_SECONDS,
                         "time_met_estimate": estimate <= TARGET_SECONDS}
    report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    plot({"dice-bce (default)": tuned["curves"], "seed-mse (popular recipe)": report["seed_mse"]["curves"]},
         tuned["val_miou_base"], out.with_name("finetune_curves.png"))
    print(json.dumps({"test_miou": {k: v["miou"] for k, v in report["test"].items()},
                      "gain_points": report["test_gain_points"], "fine_tune_s": tuned["wall_seconds"],
                      "epoch_time": report["epoch_time"], "interleaved": report["epoch_time_interleaved"],
                      "targets": report["targets"]}))


def timing_only(args: argparse.Namespace) -> None:
    """Redo only the interleaved timings against an earlier run's model dir (warm embeddings), update its JSON."""
    out = Path(args.out)
    report = json.loads(out.read_text())
    model_dir = Path(args.model_dir or report["model_dir"])
    dataset = load_coco(args.data)
    segmenter = Segmenter(load_model("lite_medsam"))
    report["machine"]["loadavg_timing_start"] = [round(x, 2) for x in os.getloadavg()]
    write(add_timing(report, segmenter, dataset, model_dir, FineTuneConfig(**report["config"])), out)


if __name__ == "__main__":
    main()
