"""What caching embeddings can save in decoder fine-tuning: (encoder + step) / step, per variant.

Run: .venv/bin/python -m benchmarks.encoder_bound  -> benchmarks/results/encoder_bound.json
vit_b has no offline checkpoint: it is timed with random weights (the cost does not depend on them).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.common import machine, round_robin
from tests import dataset
from trainer.finetune import FineTuneConfig, sample_loss, trainable_copy
from trainer.models import LoadedModel, build_network, load_model
from trainer.runtime import Segmenter, preprocess

OUT = Path(__file__).parent / "results" / "encoder_bound.json"
IMAGE = 6


def step_timer(segmenter: Segmenter, image) -> callable:
    """One training step on 4 boxes of an image whose embedding is cached: forward, backward, AdamW."""
    samples_image = dataset.annotations(IMAGE)[:4]
    from trainer.data import Sample

    samples = [Sample.from_mask(str(IMAGE), dataset.gt_mask(a), "nucleus") for a in samples_image]
    boxes = [s.box for s in samples]
    with torch.inference_mode():
        embedding = segmenter.embed(image)
    embedding = type(embedding)(embedding.features.clone(), embedding.original_size, embedding.resized_size,
                                embedding.input_size)
    decoder = trainable_copy(segmenter.model.sam.mask_decoder)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-4, fused=True)
    config = FineTuneConfig()

    def step() -> None:
        loss = sample_loss(segmenter, decoder, embedding, samples, boxes, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    image = dataset.load_image(IMAGE)
    lite = Segmenter(load_model())
    sam, size, norm = build_network("vit_b")
    vit_b = Segmenter(LoadedModel(sam.eval(), "vit_b", "0" * 64, size, norm))

    def encode(segmenter: Segmenter):
        x, _ = preprocess(image, segmenter.model)
        return lambda: segmenter.model.sam.image_encoder(x)

    with torch.no_grad():
        lite_times = round_robin({"encoder": encode(lite)}, repeat=5)
        vit_times = round_robin({"encoder": encode(vit_b)}, repeat=2, warmup=0)
    steps = round_robin({"lite_medsam": step_timer(lite, image), "vit_b": step_timer(vit_b, image)}, repeat=5)
    report = {"machine": machine(), "boxes_per_step": 4}
    for name, encoder in (("lite_medsam", lite_times["encoder"]), ("vit_b", vit_times["encoder"])):
        step = steps[name]["median_s"]
        report[name] = {"encoder_s": encoder["median_s"], "step_s": step,
                        "speedup_bound": (encoder["median_s"] + step) / step}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
