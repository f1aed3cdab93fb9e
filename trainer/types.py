"""Plain typed objects shared by serving and training: prompts in pixels, masks as arrays."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .quality import MaskQuality

if TYPE_CHECKING:
    from .frame import Frame


@dataclass(frozen=True)
class Box:
    """A box prompt in original-image pixels: x0 <= x1, y0 <= y1 (exclusive right/bottom edge)."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str | None = None

    def clipped(self, width: int, height: int) -> "Box":
        x0, x1 = sorted((min(max(self.x0, 0.0), width), min(max(self.x1, 0.0), width)))
        y0, y1 = sorted((min(max(self.y0, 0.0), height), min(max(self.y1, 0.0), height)))
        return Box(x0, y0, x1, y1, self.label)

    @property
    def is_empty(self) -> bool:
        return self.x1 - self.x0 < 1 or self.y1 - self.y0 < 1


@dataclass(frozen=True)
class Point:
    """A click in original-image pixels; positive = foreground."""

    x: float
    y: float
    positive: bool = True
    label: str | None = None


@dataclass(frozen=True)
class Prompts:
    """What the user asked for on one image.

    Each box is decoded on its own (one mask per box); points go with the single mask of an
    interactive call: with a box they refine it, without a box they make one mask together.
    """

    boxes: tuple[Box, ...] = ()
    points: tuple[Point, ...] = ()


@dataclass(frozen=True)
class Embedding:
    """An image encoder output plus the geometry needed to map prompts and masks.

    features: (1, C, h, w) float tensor; original_size: (H, W) of the image;
    resized_size: (h', w') of the image inside the model's square input frame.
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    input_size: int

    @property
    def nbytes(self) -> int:
        return self.features.element_size() * self.features.nelement()

    def to(self, device: torch.device) -> "Embedding":
        """The same embedding with its features on `device` (itself when they are there already)."""
        if self.features.device == device:
            return self
        return Embedding(self.features.to(device), self.original_size, self.resized_size, self.input_size)

    # The mapping between original pixels and the model's input frame is trainer.frame's (the one module for it).
    @property
    def frame(self) -> "Frame":
        from .frame import Frame  # frame.py builds on this module's Box and Point

        return Frame(self.original_size, self.resized_size, self.input_size, int(self.features.shape[-1]))

    @property
    def input_scale(self) -> tuple[float, float]:
        """Model-input pixels per original pixel, (y, x)."""
        return self.frame.input_scale

    @property
    def grid_per_input(self) -> float:
        """Feature-grid cells per model-input pixel."""
        return self.features.shape[-2] / self.input_size

    def box_to_input(self, box: Box) -> list[float]:
        """A box in original pixels -> [x0, y0, x1, y1] in the model's input frame."""
        return self.frame.box_to_input(box)

    def point_to_input(self, point: Point) -> list[float]:
        """A click in original pixels -> [x, y] in the model's input frame."""
        return self.frame.point_to_input(point)


@dataclass
class Mask:
    """One predicted mask, stored as the crop where it can be non-zero.

    crop: bool (h, w) array whose top-left pixel is (x0, y0) in an image of size image_size (H, W).
    score: the expected IoU in [0, 1] (trainer.quality); quality: the signals it was computed from.
    """

    crop: np.ndarray
    x0: int
    y0: int
    image_size: tuple[int, int]
    score: float
    label: str | None = None
    quality: MaskQuality | None = None

    def full(self) -> np.ndarray:
        """The mask as a bool (H, W) array."""
        out = np.zeros(self.image_size, dtype=bool)
        h, w = self.crop.shape
        out[self.y0 : self.y0 + h, self.x0 : self.x0 + w] = self.crop
        return out

    @property
    def area(self) -> int:
        return int(self.crop.sum())
