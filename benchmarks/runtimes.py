"""The image encoder's inference runtimes against PyTorch fp32, in one run so the ratios compare (issue 31, phase 1):
per runtime, the encoder's median ms per image (the encoder forward alone, on the preprocessed input; runtimes
interleaved image by image so machine noise hits them alike), and the box-prompt masks' IoU against torch fp32's
(the same torch decoder on each runtime's features; mean and worst 5 %) on both shared datasets' test images; the
first export's seconds and a cached export's load seconds (the session plus its probe check).

Runtimes: torch fp32; onnxruntime fp32 (INFERENCE_RUNTIME=onnxruntime: trainer/onnx_encoder.py, trainer/onnx_export.py); and, not offered
by the setting, onnxruntime with int8 dynamic quantisation of the MatMuls (onnxruntime.quantization).

How the server gets there (INFERENCE_RUNTIME=auto, the default): `background_export_s`, from a fresh folder, is the
time from the encoder's start to ONNX Runtime serving (the export child's start, model load and export, the
session's load and probe), while torch would serve. `session_rss_mb`: resident memory one more session adds (a
worker holds one per priority that encodes: live calls', pre-warm's). `new_image`: what a new image costs the
serving path bare (embed + a BOXES_PER_IMAGE-box decode, no HTTP, no fetch), per runtime, interleaved, and what it
implies: new images one Retrieve predictions call covers within the default PREDICT_DEADLINE_S, and a bulk
pre-label job's images per minute (both bare: the figures through a real Label Studio are lower).

Run: .venv/bin/python -m benchmarks.runtimes  -> benchmarks/results/runtimes.json (the load average goes into the
result: on a shared machine the absolute times are noisy, the ratios less so).
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine
from ml_backend.settings import Settings
from trainer.click_eval import iou
from trainer.data import load_coco
from trainer.models import load_model
from trainer.onnx_encoder import OnnxImageEncoder
from trainer.onnx_export import (INPUT, OUTPUT, _session, export_key, export_path, load_or_export,
                                  open_export)
from trainer.runtime import Segmenter, preprocess
from trainer.types import Box, Embedding, Prompts

OUT = Path(__file__).parent / "results" / "runtimes.json"
DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
IMAGES_PER_DATASET = 8
BOXES_PER_IMAGE = 6
REPEAT = 2  # timed encoder runs per image and runtime


def test_images(name: str) -> list[tuple[np.ndarray, list[Box]]]:
    """The first IMAGES_PER_DATASET test-split images of a shared dataset with up to BOXES_PER_IMAGE GT boxes."""
    images = load_coco(DATASETS / name).split("test")[:IMAGES_PER_DATASET]
    return [(image.load_image(), [sample.box for sample in image.samples[:BOXES_PER_IMAGE]]) for image in images]


def int8_matmul_encoder(fp32_path: Path, folder: Path):
    """onnxruntime's dynamic int8 quantisation of the MatMuls of the fp32 export -> an encoder callable."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = folder / "encoder-int8-matmul.onnx"
    quantize_dynamic(str(fp32_path), str(path), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
    session = _session(path, torch.get_num_threads())
    return lambda x: torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0])


def rss_mb() -> float:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


def background_export(model) -> tuple[float, float]:
    """(seconds from start() to ONNX Runtime serving in a fresh folder, the resident MB a second session adds)."""
    folder = Path(tempfile.mkdtemp(prefix="runtimes-auto-"))
    encoder = OnnxImageEncoder(model, folder)
    started = time.perf_counter()
    encoder.start()
    assert encoder.ready(timeout_s=600), encoder._fallback
    seconds = time.perf_counter() - started
    before = rss_mb()
    session = open_export(export_path(model, folder), export_key(model), model.input_size, torch.get_num_threads())
    session.run([OUTPUT], {INPUT: np.zeros((1, 3, model.input_size, model.input_size), np.float32)})
    return seconds, rss_mb() - before


def new_image_costs(segmenters: dict[str, Segmenter]) -> dict:
    """Embed + decode of BOXES_PER_IMAGE boxes on each test image of both datasets, runtimes interleaved."""
    seconds: dict[str, list[float]] = {name: [] for name in segmenters}
    images = [item for name in ("dsb2018_nuclei", "coco_everyday") for item in test_images(name)]
    for index, (image, boxes) in enumerate(images):
        names = list(segmenters)[index % len(segmenters):] + list(segmenters)[:index % len(segmenters)]
        for name in names:
            t0 = time.perf_counter()
            segmenters[name].decode(segmenters[name].embed(image), Prompts(boxes=tuple(boxes)))
            seconds[name].append(time.perf_counter() - t0)
    deadline_s = Settings().predict_deadline_s
    report = {}
    for name, values in seconds.items():
        median = statistics.median(values)
        report[name] = {"median_ms": round(1000 * median, 1),
                        "ratio_to_torch": round(median / statistics.median(seconds["torch_fp32"]), 3),
                        "new_images_per_retrieve_call_bare": int(deadline_s // median),
                        "prelabel_images_per_minute_bare": round(60 / median, 1)}
    return {"images": len(images), "predict_deadline_s": deadline_s, "runtimes": report}


def main() -> dict:
    model = load_model("lite_medsam")
    torch_segmenter = Segmenter(model)
    folder = Path(tempfile.mkdtemp(prefix="runtimes-"))
    started = time.perf_counter()
    _, export_s = load_or_export(model, folder)
    first_use_s = time.perf_counter() - started
    started = time.perf_counter()
    open_export(export_path(model, folder), export_key(model), model.input_size, torch.get_num_threads())
    cached_load_s = time.perf_counter() - started
    onnx_segmenter = Segmenter(model, runtime="onnxruntime", export_dir=folder)
    assert onnx_segmenter.encoder.ready()
    encoders = {"torch_fp32": model.sam.image_encoder, "onnxruntime_fp32": onnx_segmenter.encoder}
    started = time.perf_counter()
    encoders["onnxruntime_int8_matmul"] = int8_matmul_encoder(export_path(model, folder), folder)
    quantise_s = time.perf_counter() - started

    background_s, session_mb = background_export(model)
    report: dict = {"machine": machine(), "model": model.identity, "threads": torch.get_num_threads(),
                    "export": {"first_export_s": round(export_s, 2), "first_use_s": round(first_use_s, 2),
                               "cached_load_s": round(cached_load_s, 2), "int8_quantise_s": round(quantise_s, 2),
                               "background_export_s": round(background_s, 2),
                               "session_rss_mb": round(session_mb, 1),
                               "onnx_mb": round(export_path(model, folder).stat().st_size / 2**20, 1)},
                    "images_per_dataset": IMAGES_PER_DATASET, "boxes_per_image": BOXES_PER_IMAGE, "datasets": {}}
    all_ms: dict[str, list[float]] = {name: [] for name in encoders}
    for dataset in ("dsb2018_nuclei", "coco_everyday"):
        ms: dict[str, list[float]] = {name: [] for name in encoders}
        ious: dict[str, list[float]] = {name: [] for name in encoders if name != "torch_fp32"}
        for index, (image, boxes) in enumerate(test_images(dataset)):
            x, resized = preprocess(image, model)
            features = {}
            names = list(encoders)
            names = names[index % len(names):] + names[:index % len(names)]  # no runtime always runs first
            with torch.inference_mode():
                for name in names:
                    encoders[name](x)  # warm (first image) / settle
                for _ in range(REPEAT):
                    for name in names:
                        t0 = time.perf_counter()
                        features[name] = encoders[name](x).float()
                        ms[name].append((time.perf_counter() - t0) * 1000)
            prompts = Prompts(boxes=tuple(boxes))
            masks = {name: torch_segmenter.decode(Embedding(f, image.shape[:2], resized, model.input_size), prompts)
                     for name, f in features.items()}
            for name in ious:
                ious[name] += [iou(a.full(), b.full()) for a, b in zip(masks["torch_fp32"], masks[name])]
        summary = {}
        for name in encoders:
            all_ms[name] += ms[name]
            summary[name] = {"encoder_median_ms": round(statistics.median(ms[name]), 1),
                             "ratio_to_torch": round(statistics.median(ms[name]) / statistics.median(ms["torch_fp32"]), 3)}
            if name in ious:
                values = np.sort(np.asarray(ious[name]))
                worst = values[:max(1, int(np.ceil(0.05 * values.size)))]
                summary[name].update({"mask_iou_mean": round(float(values.mean()), 4),
                                      "mask_iou_worst_5pct_mean": round(float(worst.mean()), 4),
                                      "mask_iou_min": round(float(values[0]), 4), "masks": int(values.size)})
        report["datasets"][dataset] = summary
    torch_median = statistics.median(all_ms["torch_fp32"])
    report["overall"] = {name: {"encoder_median_ms": round(statistics.median(v), 1),
                                "ratio_to_torch": round(statistics.median(v) / torch_median, 3)}
                         for name, v in all_ms.items()}
    report["new_image"] = new_image_costs({"torch_fp32": torch_segmenter, "onnxruntime_fp32": onnx_segmenter})
    report["machine"]["loadavg_end"] = machine()["loadavg"]
    OUT.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
