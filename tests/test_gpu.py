"""The GPU paths (DEVICE=cuda): run where a CUDA device exists, skipped (with the reason) where none does.
benchmarks/gpu_check.py measures the same end to end (serving, fine-tuning, gunicorn) on a GPU host."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import dataset
from trainer.finetune import FineTuneConfig, fine_tune
from trainer.models import load_model
from trainer.runtime import Segmenter
from trainer.types import Box, Prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device on this machine: the GPU paths are not exercised here")
IMAGES = dataset.splits()["test"][:4]


def _masks(segmenter: Segmenter, image_id: int) -> list[np.ndarray]:
    boxes = tuple(Box(x, y, x + w, y + h, "nucleus") for x, y, w, h in
                  (a["bbox"] for a in dataset.annotations(image_id)))
    return [m.full() for m in segmenter.decode(segmenter.embed(dataset.load_image(image_id)), Prompts(boxes=boxes))]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def test_cuda_masks_match_cpu_fp32(segmenter):
    gpu = load_model("lite_medsam", device="cuda")
    assert gpu.device.type == "cuda"
    for name, candidate, floor in (("fp32", Segmenter(gpu), 0.99), ("autocast", Segmenter(gpu, True, True), 0.98)):
        ious = [_iou(a, b) for i in IMAGES for a, b in zip(_masks(candidate, i), _masks(segmenter, i))]
        assert np.mean(ious) >= floor, f"{name}: mean mask IoU vs CPU fp32 {np.mean(ious):.3f}"


def test_cuda_fine_tuning_runs_on_the_device(tmp_path):
    from tests.dataset import make_coco
    from trainer.cache import DiskEmbeddings
    from trainer.data import load_coco
    from trainer.finetune import TrainingEmbeddings

    split = dataset.splits()
    data = load_coco(make_coco(tmp_path / "coco", {"train": split["train"][:4], "val": split["val"][:2], "test": []}))
    segmenter = Segmenter(load_model("lite_medsam", device="cuda"))
    embeddings = TrainingEmbeddings(segmenter, DiskEmbeddings(tmp_path / "embeddings"))
    result = fine_tune(segmenter, data, embeddings, FineTuneConfig(epochs=1), progress=False)
    assert all(t.device.type == "cuda" for t in result.state.values())
    assert result.val_miou_best is not None
