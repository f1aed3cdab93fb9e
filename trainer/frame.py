"""The one coordinate mapping of a SAM family: original pixels <-> model input <-> decoder grid <-> low-res logits.

Every SAM generation feeds its encoder a square input of S pixels (S = 1024, LiteMedSAM 256) and decodes masks on
a low-res frame of L = 4 G pixels, G being the decoder grid (64 cells: one per 16 input pixels). What differs is how
the image is put into the square:

- "longest" (SAM 1, MobileSAM, LiteMedSAM; segment-anything's `ResizeLongestSide`): the longest side is resized to
  S keeping the aspect ratio, the rest is zero padding at the bottom/right; the image covers (h', w') <= (S, S).
- "stretch" (SAM 2 / 2.1): the image is resized to S x S whatever its aspect ratio (h' = w' = S).

In both cases an original pixel coordinate maps to the input frame by (x w'/W, y h'/H), and the low-res logits map
back to the original by the inverse; `Frame` holds these numbers and every function that uses them, so the runtime,
the decoders, fine-tuning and the cache never compute a scale of their own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .types import Box, Point

RESIZE_MODES = ("longest", "stretch")
UPSCALE = 4  # low-res pixels per decoder grid cell (two stride-2 transposed convolutions in every SAM decoder)


@dataclass(frozen=True)
class Frame:
    """Where one image sits in a model's input and decoder frames.

    original_size: (H, W) of the image; resized_size: (h', w') of the image inside the square input of
    input_size pixels; grid_size: G decoder grid cells per side (the low-res logits are UPSCALE G per side).
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    input_size: int
    grid_size: int
    resize: str = "longest"

    @classmethod
    def for_image(cls, original_size: tuple[int, int], input_size: int, grid_size: int, resize: str) -> "Frame":
        """The frame of an image of original_size (H, W) for a model whose input is input_size square."""
        if resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {resize!r}; one of {RESIZE_MODES}")
        height, width = int(original_size[0]), int(original_size[1])
        if resize == "stretch":
            resized = (input_size, input_size)
        else:  # ResizeLongestSide.get_preprocess_shape: int(x * scale + 0.5)
            scale = input_size / max(height, width)
            resized = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
        return cls((height, width), resized, input_size, grid_size, resize)

    # -- original <-> model input --------------------------------------------------------------------------
    @property
    def input_scale(self) -> tuple[float, float]:
        """Model-input pixels per original pixel, (y, x)."""
        (height, width), (new_h, new_w) = self.original_size, self.resized_size
        return new_h / height, new_w / width

    def box_to_input(self, box: Box) -> list[float]:
        """A box in original pixels -> [x0, y0, x1, y1] in the model's input frame."""
        sy, sx = self.input_scale
        return [box.x0 * sx, box.y0 * sy, box.x1 * sx, box.y1 * sy]

    def point_to_input(self, point: Point) -> list[float]:
        """A click in original pixels -> [x, y] in the model's input frame."""
        sy, sx = self.input_scale
        return [point.x * sx, point.y * sy]

    # -- model input <-> decoder grid <-> low-res logits -----------------------------------------------------
    @property
    def low_res_size(self) -> int:
        """Low-res logits per side (256 for a 64-cell grid)."""
        return UPSCALE * self.grid_size

    @property
    def grid_per_input(self) -> float:
        """Decoder-grid cells per model-input pixel."""
        return self.grid_size / self.input_size

    @property
    def low_res_per_original(self) -> tuple[float, float]:
        """Low-res logit pixels per original pixel, (y, x)."""
        sy, sx = self.input_scale
        per_input = UPSCALE * self.grid_per_input
        return sy * per_input, sx * per_input

    @property
    def grid_limit(self) -> tuple[int, int]:
        """Grid cells (rows, columns) that hold image pixels (the rest is padding)."""
        new_h, new_w = self.resized_size
        return math.ceil(new_h * self.grid_per_input), math.ceil(new_w * self.grid_per_input)

    def grid_window(self, box: Box | None, points: tuple[Point, ...] = (),
                    margin: float = 0.25) -> tuple[int, int, int, int]:
        """The decoder-grid cells (gy0, gx0, gy1, gx1) a box prompt's mask may cover: the box and its clicks plus
        `margin` of their extent and one cell on each side. No box: every cell of the image."""
        limit_y, limit_x = self.grid_limit
        if box is None:
            return 0, 0, limit_y, limit_x
        sy, sx = self.input_scale
        per_input = self.grid_per_input
        xs = [box.x0, box.x1] + [p.x for p in points]
        ys = [box.y0, box.y1] + [p.y for p in points]
        x0, x1 = min(xs) * sx * per_input, max(xs) * sx * per_input
        y0, y1 = min(ys) * sy * per_input, max(ys) * sy * per_input
        mx, my = margin * (x1 - x0) + 1, margin * (y1 - y0) + 1
        return (max(0, math.floor(y0 - my)), max(0, math.floor(x0 - mx)),
                min(limit_y, math.ceil(y1 + my)), min(limit_x, math.ceil(x1 + mx)))

    def low_res_to_original(self, logits: torch.Tensor, y0: int = 0,
                            x0: int = 0) -> tuple[torch.Tensor, int, int]:
        """Logits (h, w) on a window of the low-res frame whose top-left is (y0, x0) -> the logits resampled
        (bilinear, pixel centres, as F.interpolate with align_corners=False) onto the original pixels the window
        covers: (crop logits (h'', w''), crop top, crop left) in original pixels."""
        height, width = self.original_size
        ry, rx = self.low_res_per_original
        ph, pw = logits.shape
        top, bottom = max(0, math.floor(y0 / ry)), min(height, math.ceil((y0 + ph) / ry))
        left, right = max(0, math.floor(x0 / rx)), min(width, math.ceil((x0 + pw) / rx))
        device = logits.device
        ys = ((torch.arange(top, bottom, device=device) + 0.5) * ry - y0) * (2 / ph) - 1
        xs = ((torch.arange(left, right, device=device) + 0.5) * rx - x0) * (2 / pw) - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).unsqueeze(0)
        crop = F.grid_sample(logits.float()[None, None], grid.float(), mode="bilinear", padding_mode="border",
                             align_corners=False)[0, 0]
        return crop, top, left

    def window_to_full(self, logits: torch.Tensor, y0: int, x0: int, fill: float = -20.0) -> torch.Tensor:
        """Window logits -> the whole (L, L) low-res frame, `fill` (background) outside the window: what an
        interactive client sends back as the previous mask."""
        size = self.low_res_size
        full = torch.full((size, size), fill, dtype=logits.dtype, device=logits.device)
        full[y0:y0 + logits.shape[0], x0:x0 + logits.shape[1]] = logits
        return full

    def mask_to_low_res(self, mask: np.ndarray) -> torch.Tensor:
        """A bool/float (H, W) mask in original pixels -> (L, L) float in [0, 1] on the low-res frame
        (area-averaged; zero over the padding): fine-tuning's target."""
        new_h, new_w = self.resized_size
        size = self.input_size
        resized = cv2.resize(mask.astype(np.float32), (new_w, new_h), interpolation=cv2.INTER_AREA)
        frame = np.zeros((size, size), dtype=np.float32)
        frame[:new_h, :new_w] = resized
        if size != self.low_res_size:
            frame = cv2.resize(frame, (self.low_res_size, self.low_res_size), interpolation=cv2.INTER_AREA)
        return torch.from_numpy(frame)

    # -- (de)serialisation: the disk cache keeps a frame as text metadata -------------------------------------
    def metadata(self) -> dict[str, str]:
        return {"original_size": _text(self.original_size), "resized_size": _text(self.resized_size),
                "input_size": str(self.input_size), "grid_size": str(self.grid_size), "resize": self.resize}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], grid_size: int | None = None) -> "Frame":
        """The frame stored by `metadata`; files written before frames existed have no grid_size/resize
        (SAM 1: "longest", the grid given by their feature map)."""
        grid = int(meta.get("grid_size") or grid_size or 0)
        if grid <= 0:
            raise ValueError("frame metadata has no grid size")
        return cls(_pair(meta["original_size"]), _pair(meta["resized_size"]), int(meta["input_size"]), grid,
                   meta.get("resize", "longest"))


def _text(pair: tuple[int, int]) -> str:
    return f"{pair[0]},{pair[1]}"


def _pair(text: str) -> tuple[int, int]:
    a, b = text.split(",")
    return int(a), int(b)
