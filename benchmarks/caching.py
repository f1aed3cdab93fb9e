"""What caching image embeddings saves in decoder fine-tuning: one real epoch on cached embeddings vs one that
re-encodes every image (the popular recipe's way), against the bound (encoder + step) / step, per model.
The encoder's time is taken from the re-encoding epoch's own encoder calls; the step's from a pass of isolated
steps (forward, backward, AdamW) over the same images right before. Each model runs ROUNDS such rounds.

Run: .venv/bin/python -m benchmarks.caching  -> benchmarks/results/caching.json
LiteMedSAM runs the dsb2018 train split. vit_b has no offline checkpoint: it runs with random weights (its cost
does not depend on them) on the first VIT_B_IMAGES train images, as its encoder takes ~10 s an image on 2 cores.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine
from tests.dataset import DATASET
from trainer.decoder import decoder_copy
from trainer.cache import DiskEmbeddings
from trainer.data import Dataset, ImageSamples, load_coco
from trainer.finetune import (FineTuneConfig, TrainingEmbeddings, epoch_plan, fine_tune, jitter, make_loss,
                              sample_loss)
from trainer.models import LoadedModel, build_network, load_model
from trainer.runtime import Segmenter
from trainer.types import Embedding

OUT = Path(__file__).parent / "results" / "caching.json"
VIT_B_IMAGES = 8
ROUNDS = 2
TARGET_FRACTION_OF_BOUND = 0.9


def train_images(limit: int | None) -> Dataset:
    """The train split only (no validation inside the timed epochs)."""
    train = load_coco(DATASET).split("train")[:limit]
    return Dataset([ImageSamples(i.image_id, i.load_image, i.samples, "train") for i in train])


def one_epoch(segmenter: Segmenter, data: Dataset, embeddings: TrainingEmbeddings, config: FineTuneConfig) -> float:
    """Seconds of fine_tune's first epoch (training steps only)."""
    return fine_tune(segmenter, data, embeddings, replace(config, epochs=1), progress=False).curves[0]["train_seconds"]


def isolated_step_s(segmenter: Segmenter, data: Dataset, embeddings: TrainingEmbeddings, config: FineTuneConfig) -> float:
    """Mean seconds of one training step (forward, backward, AdamW) over the epoch's images, embeddings in memory."""
    decoder = decoder_copy(segmenter.model.sam.mask_decoder, trainable=True)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=config.lr, fused=True)
    rng, seconds = np.random.default_rng(0), []
    for image, picks in epoch_plan(data.images, config, 1):
        embedding = embeddings.get(image)
        samples = [image.samples[i] for i in picks]
        boxes = [jitter(s.box, rng, config.box_jitter, *embedding.original_size[::-1]) for s in samples]
        began = time.perf_counter()
        loss = sample_loss(segmenter, decoder, embedding, samples, boxes, make_loss(config))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - began)
    return statistics.mean(seconds)


class TimedRecompute(TrainingEmbeddings):
    """Re-encodes every image each time (the popular recipe's way), recording the encoder's seconds."""

    def __init__(self, segmenter: Segmenter) -> None:
        super().__init__(segmenter, None, recompute=True)
        self.encoder_s: list[float] = []

    def get(self, image: ImageSamples) -> Embedding:
        pixels = image.load_image()
        began = time.perf_counter()
        embedding = self.segmenter.embed(pixels)
        self.encoder_s.append(time.perf_counter() - began)
        return embedding


def measure(segmenter: Segmenter, data: Dataset, config: FineTuneConfig) -> dict:
    """ROUNDS x (isolated steps, a cached epoch, a re-encoding epoch), so that machine drift hits all alike."""
    rounds = []
    with tempfile.TemporaryDirectory(prefix="caching-bench-") as folder:
        embeddings = TrainingEmbeddings(segmenter, DiskEmbeddings(Path(folder)))
        for image in data.images:  # fills the cache the cached epochs read
            embeddings.get(image)
        for _ in range(ROUNDS):
            recompute = TimedRecompute(segmenter)
            rounds.append({"step_s": isolated_step_s(segmenter, data, embeddings, config),
                           "cached_epoch_s": one_epoch(segmenter, data, embeddings, config),
                           "recompute_epoch_s": one_epoch(segmenter, data, recompute, config),
                           "encoder_s": statistics.mean(recompute.encoder_s)})
    mean = {key: statistics.mean(r[key] for r in rounds) for key in rounds[0]}
    bound = (mean["encoder_s"] + mean["step_s"]) / mean["step_s"]
    speedup = mean["recompute_epoch_s"] / mean["cached_epoch_s"]
    return {"train_images": len(data.images), "objects_per_step": config.max_objects_per_image,
            **{key: round(value, 3) for key, value in mean.items()}, "speedup_bound": round(bound, 2),
            "speedup": round(speedup, 2), "fraction_of_bound": round(speedup / bound, 3),
            "met": speedup >= TARGET_FRACTION_OF_BOUND * bound,
            "rounds": [{key: round(value, 3) for key, value in r.items()} for r in rounds]}


def main() -> None:
    config = FineTuneConfig()
    report = {"machine": machine(), "target": f"speedup >= {TARGET_FRACTION_OF_BOUND} x bound", "config": vars(config)}
    report["lite_medsam"] = measure(Segmenter(load_model("lite_medsam")), train_images(None), config)
    print(json.dumps(report["lite_medsam"]), flush=True)
    sam, size, normalization = build_network("vit_b")
    for parameter in sam.parameters():
        parameter.requires_grad_(False)
    vit_b = Segmenter(LoadedModel(sam.eval(), "vit_b", "0" * 64, size, normalization))
    report["vit_b"] = {"weights": "random", **measure(vit_b, train_images(VIT_B_IMAGES), config)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
