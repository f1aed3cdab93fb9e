"""Prediction speed benchmark (issue: serve SAM masks): the backend under gunicorn vs the bare model.

Run: .venv/bin/python -m benchmarks.predict   -> benchmarks/results/predict.json
All traffic stays on 127.0.0.1. Every ratio compares measurements taken interleaved in this one run.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch
from label_studio_sdk.converter.brush import mask2rle

from benchmarks.common import machine, round_robin, timed
from tests import dataset
from tests.backend_server import start_backend
from tests.image_server import serve_files
from trainer.decoder import decode_windows, prepare_image
from trainer.models import load_model
from trainer.runtime import Segmenter, preprocess
from trainer.types import Box, Prompts

TOKEN = "bench-token-123"
CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="box" toName="image"><Label value="nucleus"/></RectangleLabels>
<BrushLabels name="mask" toName="image"><Label value="nucleus"/></BrushLabels></View>"""
BIG_IMAGE = 69  # 696x520, 145 nuclei
OUT = Path(__file__).parent / "results" / "predict.json"


def boxes_of(image_id: int, n: int) -> list[Box]:
    return [Box(x, y, x + w, y + h, "nucleus") for x, y, w, h in
            (a["bbox"] for a in dataset.annotations(image_id)[:n])]


def task(image_id: int, n: int, task_id: int) -> dict:
    info = dataset.image_info(image_id)
    W, H = info["width"], info["height"]
    result = [{"type": "rectanglelabels", "from_name": "box", "to_name": "image",
               "value": {"x": 100 * b.x0 / W, "y": 100 * b.y0 / H, "width": 100 * (b.x1 - b.x0) / W,
                         "height": 100 * (b.y1 - b.y0) / H, "rectanglelabels": ["nucleus"]}}
              for b in boxes_of(image_id, n)]
    return {"id": task_id, "data": {"image": f"/data/upload/1/{image_id:04d}.png"},
            "annotations": [{"id": task_id, "result": result}]}


def post(url: str, tasks: list[dict]) -> float:
    started = time.perf_counter()
    response = requests.post(f"{url}/predict", json={"tasks": tasks, "label_config": CONFIG, "project": "1.1",
                                                     "params": {"context": None}}, timeout=300)
    response.raise_for_status()
    assert len(response.json()["results"]) == len(tasks)
    return time.perf_counter() - started


class BareModel:
    """The model without the service: what a box costs in segment-anything's own decoder forward."""

    def __init__(self, model) -> None:
        self.model, self.sam = model, model.sam
        self.segmenter = Segmenter(model)
        self.segmenter_bf16 = Segmenter(model, decoder_bf16=True)
        self.image = dataset.load_image(BIG_IMAGE)
        self.boxes = boxes_of(BIG_IMAGE, 10)
        self.x, (new_h, new_w) = preprocess(self.image, model)
        H, W = self.image.shape[:2]
        self.scaled = [torch.tensor([[b.x0 * new_w / W, b.y0 * new_h / H, b.x1 * new_w / W, b.y1 * new_h / H]])
                       for b in self.boxes]
        with torch.inference_mode():
            self.embedding = self.segmenter.embed(self.image)

    @torch.inference_mode()
    def sam_decoder_10_single_box_calls(self) -> None:
        pe = self.sam.prompt_encoder.get_dense_pe()
        for box in self.scaled:
            sparse, dense = self.sam.prompt_encoder(points=None, boxes=box, masks=None)
            self.sam.mask_decoder(self.embedding.features, pe, sparse, dense, False)

    @torch.inference_mode()
    def encoder(self, bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            self.sam.image_encoder(self.x)


def bf16_quality(model) -> dict:
    """Mask IoU of bf16 encoder / decoder against fp32, over every box of 5 test images."""
    fp32, enc16, dec16 = Segmenter(model), Segmenter(model, encoder_bf16=True), Segmenter(model, decoder_bf16=True)
    enc_ious, dec_ious = [], []
    for image_id in dataset.splits()["test"][:5]:
        image = dataset.load_image(image_id)
        prompts = Prompts(tuple(boxes_of(image_id, 1000)))
        embedding = fp32.embed(image)
        reference = [m.full() for m in fp32.decode(embedding, prompts)]
        enc_ious += [dataset.iou(r, m.full()) for r, m in zip(reference, fp32.decode(enc16.embed(image), prompts))]
        dec_ious += [dataset.iou(r, m.full()) for r, m in zip(reference, dec16.decode(embedding, prompts))]
    summary = lambda v: {"mean": float(np.mean(v)), "min": float(np.min(v)), "n": len(v)}
    return {"encoder_bf16_mask_iou_vs_fp32": summary(enc_ious), "decoder_bf16_mask_iou_vs_fp32": summary(dec_ious)}


def main() -> None:
    torch.manual_seed(0)
    model = load_model()
    bare = BareModel(model)
    report: dict = {"machine": machine(), "model": model.identity}
    with torch.inference_mode():
        sam, emb = model.sam, bare.embedding
        tokens = prepare_image(sam.mask_decoder, sam.prompt_encoder, emb.features)
        sparse = torch.cat([sam.prompt_encoder(points=None, boxes=b, masks=None)[0] for b in bare.scaled])
        whole = [(0, 0, 64, 64)] * 10
        prompts = Prompts(tuple(bare.boxes))
        report["model_alone"] = round_robin({
            "encoder_fp32": lambda: bare.encoder(False),
            "encoder_bf16": lambda: bare.encoder(True),
            "sam_decoder_10_single_box_calls_fp32": bare.sam_decoder_10_single_box_calls,
            "ours_decode_10_boxes_fp32": lambda: bare.segmenter.decode(emb, prompts),
            "ours_decode_10_boxes_bf16": lambda: bare.segmenter_bf16.decode(emb, prompts),
            "ours_transformer_10_per_box_calls_whole_grid": lambda: [
                decode_windows(sam.mask_decoder, tokens, sparse[i:i + 1], whole[:1]) for i in range(10)],
            "ours_transformer_10_boxes_one_batched_call_whole_grid": lambda: decode_windows(
                sam.mask_decoder, tokens, sparse, whole),
        }, repeat=7)
    full = np.zeros(bare.image.shape[:2], np.uint8)
    full[100:140, 200:260] = 255
    report["mask2rle_one_mask_696x520"] = timed(lambda: mask2rle(full), repeat=20)
    report["quality"] = bf16_quality(model)

    ids = sorted({BIG_IMAGE, *dataset.splits()["test"], *dataset.splits()["val"]})
    files = {f"/data/upload/1/{i:04d}.png": dataset.image_path(i) for i in ids}
    cold_ids = [i for i in dataset.splits()["val"] if len(dataset.annotations(i)) >= 10][:6]
    batch_ids = [i for i in dataset.splits()["test"] if len(dataset.annotations(i)) >= 10][:20]
    with tempfile.TemporaryDirectory() as tmp, serve_files(files, TOKEN) as image_url:
        env = {"LABEL_STUDIO_URL": image_url, "LABEL_STUDIO_API_KEY": TOKEN, "MODEL_DIR": str(Path(tmp) / "models"),
               "EMBEDDING_DISK_CACHE": "false", "WORKERS": "1", "THREADS": "4", "LOG_LEVEL": "WARNING",
               "TRAINING_RUNNER": "off"}
        with start_backend(env, Path(tmp) / "gunicorn.log") as url:
            post(url, [task(BIG_IMAGE, 100, 1)])
            http = round_robin({
                "sam_decoder_10_single_box_calls_fp32": bare.sam_decoder_10_single_box_calls,
                "encoder_fp32": lambda: bare.encoder(False),
                "warm_10_boxes_http": lambda: post(url, [task(BIG_IMAGE, 10, 1)]),
                "warm_100_boxes_http": lambda: post(url, [task(BIG_IMAGE, 100, 1)]),
            }, repeat=5)
            cold = [post(url, [task(i, 10, i)]) for i in cold_ids]  # each a new image: encoder runs
            http["cold_10_boxes_http"] = {"median_s": statistics.median(cold), "n": len(cold), "image_ids": cold_ids}
            seconds = post(url, [task(i, 10, i) for i in batch_ids])
            http["batch_tasks_cold_http"] = {"tasks": len(batch_ids), "boxes_per_task": 10, "seconds": seconds,
                                             "tasks_per_s": len(batch_ids) / seconds}
            http["peak_rss_mb_worker"] = peak_rss_mb("ml_backend.wsgi")
    report["http"] = http

    alone = report["model_alone"]
    bare_decoder = http["sam_decoder_10_single_box_calls_fp32"]["median_s"]
    warm10 = http["warm_10_boxes_http"]["median_s"]
    ratios = {
        "warm_10_http_over_sam_decoder_10_calls": warm10 / bare_decoder,
        "ours_decode_10_fp32_over_sam_decoder_10_calls": alone["ours_decode_10_boxes_fp32"]["median_s"]
        / alone["sam_decoder_10_single_box_calls_fp32"]["median_s"],
        "ours_decode_10_bf16_over_sam_decoder_10_calls": alone["ours_decode_10_boxes_bf16"]["median_s"]
        / alone["sam_decoder_10_single_box_calls_fp32"]["median_s"],
        "cold_10_minus_encoder_minus_warm_10_s": http["cold_10_boxes_http"]["median_s"]
        - http["encoder_fp32"]["median_s"] - warm10,
        "warm_100_over_warm_10": http["warm_100_boxes_http"]["median_s"] / warm10,
        "encoder_bf16_speedup": alone["encoder_fp32"]["median_s"] / alone["encoder_bf16"]["median_s"],
        "batched_call_over_per_box_calls": alone["ours_transformer_10_boxes_one_batched_call_whole_grid"]["median_s"]
        / alone["ours_transformer_10_per_box_calls_whole_grid"]["median_s"],
    }
    report["ratios"] = ratios
    report["targets_met"] = {
        "warm 10-box HTTP <= 1.2 x ten SAM decoder calls": ratios["warm_10_http_over_sam_decoder_10_calls"] <= 1.2,
        "cold <= encoder + warm + 0.1 s": ratios["cold_10_minus_encoder_minus_warm_10_s"] <= 0.1,
        "100 boxes <= 11 x 10 boxes": ratios["warm_100_over_warm_10"] <= 11,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2))
    print(json.dumps({"ratios": ratios, "targets_met": report["targets_met"]}, indent=2))


def peak_rss_mb(needle: str) -> float | None:
    """VmHWM of the process whose command line contains needle (the gunicorn worker)."""
    peak = None
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            if needle not in (pid_dir / "cmdline").read_text():
                continue
            for line in (pid_dir / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak or 0.0, int(line.split()[1]) / 1024)
        except OSError:
            continue
    return peak


if __name__ == "__main__":
    main()
