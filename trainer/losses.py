"""Training losses as objects (micro-sam's way): the loop takes one and calls it on one image's outputs.

WindowDiceLoss (dice-bce, dice-focal) scores the masks on each object's window of the decoder's low-res frame,
where serving predicts; SeedMSELoss reproduces the widely copied recipe as a baseline (its gradient is zero).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from .types import Embedding

FOCAL_WEIGHT = 20.0  # SAM's paper: focal and Dice in a 20:1 ratio


@dataclass(frozen=True)
class WindowDiceLoss:
    """Per object: logits (h, w) on its window (y0, x0, y1, x1) of the low-res frame, target (256, 256) in [0, 1]
    -> mean over objects of Dice + BCE (or FOCAL_WEIGHT x focal) on the window, + iou_weight * MSE(iou_pred (B,),
    true IoU). Target pixels outside the window count as missed: serving predicts background there.
    """

    focal: bool = False
    iou_weight: float = 1.0
    on_windows: ClassVar[bool] = True  # takes the serving path's windowed decoder outputs

    def __call__(self, logits: list[torch.Tensor], iou_pred: torch.Tensor, targets: list[torch.Tensor],
                 windows: list[tuple[int, int, int, int]]) -> torch.Tensor:
        mask_losses, true_ious = [], []
        for logit, target, (y0, x0, y1, x1) in zip(logits, targets, windows):
            inside = target[y0:y1, x0:x1]
            prob = logit.sigmoid()
            dice = 1 - (2 * (prob * inside).sum() + 1) / (prob.sum() + target.sum() + 1)
            pixels = (FOCAL_WEIGHT * sigmoid_focal_loss(logit, inside, reduction="mean") if self.focal
                      else F.binary_cross_entropy_with_logits(logit, inside))
            mask_losses.append(dice + pixels)
            with torch.no_grad():
                hits = ((logit > 0) & (inside > 0.5)).sum()
                true_ious.append(hits / ((logit > 0).sum() + (target > 0.5).sum() - hits).clamp(min=1))
        return torch.stack(mask_losses).mean() + self.iou_weight * F.mse_loss(iou_pred, torch.stack(true_ious).float())


@dataclass(frozen=True)
class SeedMSELoss:
    """The popular recipe: MSE(normalize(threshold(upscaled, 0, 0)), gt) at the original size.

    With one mask channel this is piecewise constant in the logits: its gradient is zero (exactly, or float
    rounding of ~1e-9 from normalize's backward, which Adam's scaling can still turn into a slow random walk).
    """

    on_windows: ClassVar[bool] = False  # takes segment-anything's full low-res masks (B, 1, 256, 256)

    def __call__(self, logits: torch.Tensor, embedding: Embedding, masks: list[np.ndarray]) -> torch.Tensor:
        size = embedding.input_size
        new_h, new_w = embedding.resized_size
        upscaled = F.interpolate(logits, (size, size), mode="bilinear", align_corners=False)[..., :new_h, :new_w]
        upscaled = F.interpolate(upscaled, embedding.original_size, mode="bilinear", align_corners=False)
        gt = torch.from_numpy(np.stack(masks)).float().unsqueeze(1).to(logits.device)
        return F.mse_loss(F.normalize(F.threshold(upscaled, 0.0, 0)), gt)


LOSSES = {"dice-bce": WindowDiceLoss(), "dice-focal": WindowDiceLoss(focal=True), "seed-mse": SeedMSELoss()}
