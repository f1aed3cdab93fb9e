"""The GPU check (issue 18): serving and fine-tuning end to end on a CUDA device, timed and compared with CPU fp32.

Run on a GPU host:  .venv/bin/python -m benchmarks.gpu_check            -> benchmarks/results/gpu_check.json
Without CUDA it says so and exits 3 (nothing is written). `--device cpu --out FILE` runs every step on the CPU
against itself: a dry run of this script, not a measurement.

Steps: (1) the encoder + every GT box of 12 dsb2018 test images on the device, fp32 and autocast, vs CPU fp32:
timings and mask IoU (target >= 0.98 for autocast); (2) a fine-tuning job on 24 train + 6 val images on the device
through train_and_register (the job's path): wall time and test mIoU before/after; (3) the backend under gunicorn
with DEVICE set: a 10-box /predict answered, its masks vs CPU fp32.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch

from benchmarks.common import machine
from tests import dataset
from tests.backend_server import start_backend
from tests.dataset import make_coco
from tests.image_server import serve_files
from tests.label_studio import brush_mask, rect_result
from trainer.cache import DiskEmbeddings
from trainer.data import load_coco
from trainer.finetune import FineTuneConfig, TrainingEmbeddings, evaluate, train_and_register
from trainer.models import load_model
from trainer.registry import Registry
from trainer.runtime import Segmenter
from trainer.types import Box, Prompts

TOKEN = "gpu-check-token"
CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="box" toName="image"><Label value="nucleus"/></RectangleLabels>
<BrushLabels name="mask" toName="image"><Label value="nucleus"/></BrushLabels></View>"""
OUT = Path(__file__).parent / "results" / "gpu_check.json"


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def boxes(image_id: int, limit: int | None = None) -> tuple[Box, ...]:
    return tuple(Box(x, y, x + w, y + h, "nucleus") for x, y, w, h in
                 (a["bbox"] for a in dataset.annotations(image_id)[:limit]))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def masks_and_time(segmenter: Segmenter, image_id: int) -> tuple[list[np.ndarray], float, float]:
    image = dataset.load_image(image_id)
    device = segmenter.model.device
    started = time.perf_counter()
    embedding = segmenter.embed(image)
    sync(device)
    encoded = time.perf_counter()
    masks = segmenter.decode(embedding, Prompts(boxes=boxes(image_id)))
    sync(device)
    return [m.full() for m in masks], encoded - started, time.perf_counter() - encoded


def serving_path(device: str, images: list[int]) -> dict:
    cpu = Segmenter(load_model("lite_medsam"))
    model = load_model("lite_medsam", device=device)
    runs = {"fp32": Segmenter(model), "autocast": Segmenter(model, encoder_bf16=True, decoder_bf16=True)}
    for segmenter in runs.values():  # warm-up: kernels, allocator
        masks_and_time(segmenter, images[0])
    result = {}
    reference = {i: masks_and_time(cpu, i) for i in images}
    for name, segmenter in runs.items():
        ious, encode_s, decode_s, gt = [], [], [], []
        for image_id in images:
            masks, encode, decode = masks_and_time(segmenter, image_id)
            ious += [iou(a, b) for a, b in zip(masks, reference[image_id][0])]
            gt += [iou(m, dataset.gt_mask(a)) for m, a in zip(masks, dataset.annotations(image_id))]
            encode_s.append(encode)
            decode_s.append(decode / max(1, len(masks)))
        result[name] = {"mask_iou_vs_cpu_fp32_mean": round(float(np.mean(ious)), 4),
                        "mask_iou_vs_cpu_fp32_min": round(float(np.min(ious)), 4),
                        "gt_miou": round(float(np.mean(gt)), 4), "encode_s_median": round(statistics.median(encode_s), 4),
                        "decode_per_box_ms_median": round(1000 * statistics.median(decode_s), 2)}
    result["cpu_fp32"] = {"encode_s_median": round(statistics.median(r[1] for r in reference.values()), 4),
                          "gt_miou": round(float(np.mean([iou(m, dataset.gt_mask(a)) for i in images for m, a in
                                                          zip(reference[i][0], dataset.annotations(i))])), 4)}
    result["objects"] = sum(len(dataset.annotations(i)) for i in images)
    return result


def fine_tuning(device: str, work: Path) -> dict:
    split = dataset.splits()
    coco = make_coco(work / "coco", {"train": split["train"][:24], "val": split["val"][:6], "test": split["test"][:6]})
    data = load_coco(coco)
    segmenter = Segmenter(load_model("lite_medsam", device=device))
    embeddings = TrainingEmbeddings(segmenter, DiskEmbeddings(work / "models" / "embeddings"))
    before = evaluate(segmenter, embeddings, data.split("test"))["miou"]
    started = time.perf_counter()
    report = train_and_register(segmenter, data, Registry(work / "models", "gpu-check"), work / "models",
                                FineTuneConfig(epochs=3), progress=False)
    seconds = time.perf_counter() - started
    registry = Registry(work / "models", "gpu-check")
    decoder = segmenter.fine_tuned_decoder(registry.load_decoder(report["version"]))
    after = evaluate(segmenter, embeddings, data.split("test"), decoder)["miou"]
    return {"train_images": 24, "val_images": 6, "epochs": 3, "seconds": round(seconds, 1),
            "promoted": report["promoted"], "test_miou_base": before, "test_miou_fine_tuned": after}


def served(device: str, work: Path, image_id: int) -> dict:
    info = dataset.image_info(image_id)
    annotations = dataset.annotations(image_id)[:10]
    task = {"id": 1, "data": {"image": f"/data/upload/1/{image_id}.png"}, "annotations": [{"id": 1, "result": [
        rect_result(*a["bbox"], info["width"], info["height"], "nucleus") for a in annotations]}]}
    cpu = Segmenter(load_model("lite_medsam"))
    reference = cpu.decode(cpu.embed(dataset.load_image(image_id)), Prompts(boxes=boxes(image_id, 10)))
    with serve_files({f"/data/upload/1/{image_id}.png": dataset.image_path(image_id)}, TOKEN) as host:
        env = {"DEVICE": device, "LABEL_STUDIO_URL": host, "LABEL_STUDIO_API_KEY": TOKEN, "LOG_LEVEL": "WARNING",
               "MODEL_DIR": str(work / "served"), "TRAINING_RUNNER": "off", "WORKERS": "1"}
        with start_backend(env, work / "backend.log") as url:
            timings = []
            for _ in range(4):
                started = time.perf_counter()
                response = requests.post(f"{url}/predict", json={"tasks": [task], "label_config": CONFIG,
                                                                 "project": "1.1"}, timeout=300)
                timings.append(time.perf_counter() - started)
                response.raise_for_status()
    regions = response.json()["results"][0]["result"]
    ious = [iou(brush_mask(r), m.full()) for r, m in zip(regions, reference)]
    return {"boxes": len(annotations), "regions": len(regions), "first_call_s": round(timings[0], 3),
            "warm_call_s_median": round(statistics.median(timings[1:]), 3),
            "mask_iou_vs_cpu_fp32_mean": round(float(np.mean(ious)), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: the GPU check needs a GPU host (nothing measured, nothing written)",
              file=sys.stderr)
        return 3
    images = dataset.splits()["test"][:12]
    result = {"machine": machine(), "device": args.device,
              "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu (dry run)"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result["serving_path"] = serving_path(args.device, images)
        print(json.dumps(result["serving_path"]), flush=True)
        result["fine_tuning"] = fine_tuning(args.device, work)
        print(json.dumps(result["fine_tuning"]), flush=True)
        result["served_over_http"] = served(args.device, work, images[0])
        print(json.dumps(result["served_over_http"]), flush=True)
    autocast = result["serving_path"]["autocast"]["mask_iou_vs_cpu_fp32_mean"]
    result["autocast_within_target"] = autocast >= 0.98
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
