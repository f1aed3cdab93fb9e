"""What a model family costs on this machine, at full size with random weights (the cost does not depend on them):
the encoder per 1024 x 1024 image, a warm decode of 10 boxes on one image (ours: one batched call with each box's
grid window, the shared per-image work done once) against ten bare decodes of the family's own decoder (the
library's forward on the cached embedding, one box each), and the embedding's bytes in memory and on disk.

Run: .venv/bin/python -m benchmarks.families  -> benchmarks/results/families.json (only on a quiet machine:
the load average goes into the result). Families measured: SAM 2.1 Hiera tiny (transformers' Sam2Model).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, round_robin, timed
from trainer.families import DecodeRequest
from trainer.families.sam2 import VARIANTS, Sam2Family
from trainer.types import Box

OUT = Path(__file__).parent / "results" / "families.json"
ENCODER_REPEAT = 3
DECODE_REPEAT = 10
BOXES = 10


def image_1024(seed: int = 0) -> np.ndarray:
    """A 1024 x 1024 RGB image with smooth regions and edges."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:1024, 0:1024]
    image = np.stack([x / 4, y / 4, (x + y) / 8], axis=-1)
    for _ in range(12):
        cy, cx, r = rng.integers(0, 1024, 2).tolist() + [int(rng.integers(40, 160))]
        image[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    return image.astype(np.uint8)


def boxes(n: int, seed: int = 1) -> list[Box]:
    """n boxes of 60-250 pixels a side inside the 1024 image (objects a labeller would box)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = rng.integers(60, 250, 2)
        x0, y0 = rng.integers(0, 1024 - w), rng.integers(0, 1024 - h)
        out.append(Box(float(x0), float(y0), float(x0 + w), float(y0 + h)))
    return out


def sam2_tiny() -> dict:
    from safetensors.torch import save_file
    from transformers import Sam2Model

    variant = VARIANTS["sam2.1_hiera_tiny"]
    torch.manual_seed(0)
    model = Sam2Model(variant.config()).eval()
    family = Sam2Family(model, variant, "0" * 64)
    image = image_1024()
    encoder = timed(lambda: family.embed(image), repeat=ENCODER_REPEAT)
    embedding = family.embed(image)

    requests = [DecodeRequest(box=b, window=embedding.frame.grid_window(b)) for b in boxes(BOXES)]
    maps = [embedding.maps[k] for k in ("high_res_s0", "high_res_s1", "features")]

    def bare_decodes() -> None:
        """The library's own forward, on the cached embedding, one box per call (no windows, nothing shared)."""
        with torch.inference_mode():
            for request in requests:
                box = torch.tensor([[embedding.frame.box_to_input(request.box)]])
                model(image_embeddings=maps, input_boxes=box, multimask_output=False)

    def ours_batched() -> None:
        with torch.inference_mode():
            family.decode(embedding, requests)

    def ours_one_by_one() -> None:
        with torch.inference_mode():
            for request in requests:
                family.decode(embedding, [request])

    decode = round_robin({"ours_10_boxes_one_call": ours_batched, "ours_10_single_calls": ours_one_by_one,
                          "library_10_bare_decodes": bare_decodes}, repeat=DECODE_REPEAT, warmup=2)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "embedding.safetensors"
        save_file(embedding.tensors(), str(path), metadata=embedding.metadata())
        disk = path.stat().st_size
        half = Path(folder) / "half.safetensors"
        save_file({k: v.half() for k, v in embedding.tensors().items()}, str(half), metadata=embedding.metadata())
        disk_fp16 = half.stat().st_size
    bare = decode["library_10_bare_decodes"]["median_s"]
    return {"variant": variant.name, "parameters": sum(p.numel() for p in model.parameters()),
            "encoder_per_1024_image": encoder, "decode_10_boxes": decode,
            "ours_batched_over_bare": round(decode["ours_10_boxes_one_call"]["median_s"] / bare, 3),
            "embedding_maps": {k: list(v.shape) for k, v in embedding.maps.items()},
            "embedding_bytes_memory": embedding.nbytes, "embedding_bytes_disk": disk,
            "embedding_bytes_disk_if_fp16": disk_fp16}


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = {"machine": machine(), "sam2.1_hiera_tiny": sam2_tiny()}
    OUT.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
