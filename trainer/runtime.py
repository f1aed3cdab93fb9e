"""Stateless SAM runtime shared by serving and training: embed(image) -> Embedding, decode(...) -> masks."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder

from .decoder import UPSCALE, LowResMask, decode_windows, decoder_copy, prepare_image
from .calibration import Calibration
from .clicks import STRATEGIES, ClickHistory
from .inference_runtime import InferenceRuntime
from .models import LoadedModel
from .onnx_encoder import OnnxImageEncoder, image_encoder
from .quality import expected_iou, measure_quality
from .types import Box, Embedding, Mask, Point, Prompts

BASE_VERSION = "base"


def preprocess(image: np.ndarray, model: LoadedModel) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB uint8 (H, W, 3) -> model input (1, 3, S, S) float and the resized size (h', w') inside it.

    Longest side resized to S, then normalised (LiteMedSAM: min-max to 0..1; SAM: ImageNet mean/std),
    then zero-padded bottom/right to S x S.
    """
    size = model.input_size
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_h, new_w = max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    x = torch.from_numpy(np.ascontiguousarray(resized)).to(model.device).permute(2, 0, 1).float()
    if model.normalization == "minmax":
        x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-8)
    else:
        x = (x - model.sam.pixel_mean) / model.sam.pixel_std
    x = F.pad(x, (0, size - new_w, 0, size - new_h))
    return x.unsqueeze(0), (new_h, new_w)


def autocast(enabled: bool, device: torch.device):
    """Reduced precision where asked: bf16 on CPU; on CUDA bf16 where the GPU has it, else fp16."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, dtype=torch.bfloat16)


class Segmenter:
    """SAM split into the expensive per-image encoder and the cheap per-prompt decoder.

    Holds no per-image state, so threads can share one instance. `decode` takes the mask decoder to
    use (a project's fine-tuned one, see `fine_tuned_decoder`), the base model's when None.

    `runtime` runs the image encoder (INFERENCE_RUNTIME): torch, or onnxruntime with its export cached under
    `export_dir` (MODEL_DIR/exports; `trainer.onnx_encoder`: torch serves until the export is ready, and where it
    cannot run). ENCODER_BF16 applies to torch only: auto then means torch; onnxruntime named runs in fp32.
    """

    def __init__(self, model: LoadedModel, encoder_bf16: bool = False, decoder_bf16: bool = False,
                 window_margin: float = 0.25, runtime: InferenceRuntime | str = InferenceRuntime.TORCH,
                 export_dir: Path | None = None) -> None:
        self.model = model
        self.encoder_bf16 = encoder_bf16
        self.decoder_bf16 = decoder_bf16
        self.window_margin = window_margin
        if encoder_bf16 and InferenceRuntime(runtime) is InferenceRuntime.AUTO:
            runtime = InferenceRuntime.TORCH
        self.encoder = image_encoder(model, runtime, export_dir)

    def start(self) -> None:
        """Prepare the encoder's runtime in the background (an ONNX export's check or build; nothing for torch).
        Call it from a thread of the priority that serves: the runtime's worker threads take it."""
        if isinstance(self.encoder, OnnxImageEncoder):
            self.encoder.start()

    def stop(self, timeout_s: float = 10.0) -> bool:
        """At the process's exit: end that background work. Returns whether it has ended."""
        return self.encoder.stop(timeout_s) if isinstance(self.encoder, OnnxImageEncoder) else True

    @property
    def encoder_identity(self) -> str:
        """What an embedding depends on: the base model (the encoder is never fine-tuned).

        Not the runtime: ONNX Runtime's fp32 features differ from torch's by float noise only (~1e-6; masks agree,
        tests/test_runtime_onnx.py), as bf16 autocast's do by more, so every runtime shares the memory and disk
        embedding caches and switching INFERENCE_RUNTIME keeps them warm."""
        return self.model.identity

    def model_version(self, decoder_version: str = BASE_VERSION) -> str:
        return f"{self.model.identity}@{decoder_version}"

    def fine_tuned_decoder(self, state_dict: dict[str, torch.Tensor]) -> MaskDecoder:
        """A copy of the base decoder with fine-tuned weights (strict: every tensor must fit)."""
        return decoder_copy(self.model.sam.mask_decoder, state_dict)

    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> Embedding:
        """RGB uint8 (H, W, 3) -> Embedding with features (1, 256, 64, 64)."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
        x, resized = preprocess(image, self.model)
        with autocast(self.encoder_bf16, x.device):
            features = self.encoder(x)
        return Embedding(features.float(), image.shape[:2], resized, self.model.input_size)

    @torch.inference_mode()
    def embed_many(self, images: list[np.ndarray]) -> list[Embedding]:
        """Several RGB uint8 images in one encoder forward (a batch: it pays on a GPU) -> one Embedding each,
        the same as `embed` gives."""
        if len(images) <= 1:
            return [self.embed(image) for image in images]
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected RGB uint8 images (H, W, 3), got {image.dtype} {image.shape}")
        inputs = [preprocess(image, self.model) for image in images]
        batch = torch.cat([x for x, _ in inputs])
        with autocast(self.encoder_bf16, batch.device):
            features = self.encoder(batch).float()
        return [Embedding(features[i:i + 1].clone(), image.shape[:2], resized, self.model.input_size)
                for i, (image, (_, resized)) in enumerate(zip(images, inputs))]

    @torch.inference_mode()
    def decode(self, embedding: Embedding, prompts: Prompts, decoder: MaskDecoder | None = None,
               calibration: Calibration | None = None, history: ClickHistory | None = None) -> list[Mask]:
        """One mask per box, or with clicks one mask for the box (if any) refined by every click (`trainer.clicks`:
        what each click means on this model; `history` remembers an editor session's earlier steps).

        Masks come back at the original resolution, as crops around the prompt (see `Mask`), each scored with
        its expected IoU (`trainer.quality`), mapped through the served version's `calibration` when it has one.
        """
        decoder = decoder or self.model.sam.mask_decoder
        embedding = embedding.to(self.model.device)  # from the disk cache: on the CPU
        boxes = [b.clipped(embedding.original_size[1], embedding.original_size[0]) for b in prompts.boxes]
        if prompts.points and len(boxes) > 1:
            raise ValueError("points can refine one box at most")
        with autocast(self.decoder_bf16, self.model.device):
            if prompts.points:
                clicks = STRATEGIES[self.model.box_only](self, embedding, decoder, history)
                return [clicks.decode(Prompts(tuple(boxes), prompts.points), calibration)]
            if not boxes:
                return []
            image = prepare_image(decoder, self.model.sam.prompt_encoder, embedding.features)
            masks = []
            for box in boxes:
                sparse = self.prompt_embedding(embedding, box, ())
                window = self.grid_window(embedding, box, ())
                (low_res,) = decode_windows(decoder, image, sparse, [window])
                masks.append(self.to_original(embedding, low_res, box, (), calibration))
        return masks

    def prompt_embedding(self, embedding: Embedding, box: Box | None, points: tuple[Point, ...]) -> torch.Tensor:
        """The prompt encoder's sparse embedding (1, N, C) of a box and/or clicks (original pixels)."""
        box_tensor = None
        if box is not None:
            box_tensor = torch.tensor([embedding.box_to_input(box)], device=self.model.device)
        point_input = None
        if points:
            coords = torch.tensor([[embedding.point_to_input(p) for p in points]], device=self.model.device)
            labels = torch.tensor([[1 if p.positive else 0 for p in points]], device=self.model.device)
            point_input = (coords, labels)
        sparse, _ = self.model.sam.prompt_encoder(points=point_input, boxes=box_tensor, masks=None)
        return sparse

    def grid_window(self, embedding: Embedding, box: Box | None,
                    points: tuple[Point, ...]) -> tuple[int, int, int, int]:
        """The decoder-grid cells (gy0, gx0, gy1, gx1) whose pixels the mask may cover."""
        per_input = embedding.grid_per_input
        new_h, new_w = embedding.resized_size
        limit_y, limit_x = math.ceil(new_h * per_input), math.ceil(new_w * per_input)
        if box is None:
            return 0, 0, limit_y, limit_x
        sy, sx = embedding.input_scale
        xs = [box.x0, box.x1] + [p.x for p in points]
        ys = [box.y0, box.y1] + [p.y for p in points]
        x0, x1 = min(xs) * sx * per_input, max(xs) * sx * per_input
        y0, y1 = min(ys) * sy * per_input, max(ys) * sy * per_input
        mx = self.window_margin * (x1 - x0) + 1
        my = self.window_margin * (y1 - y0) + 1
        return (max(0, math.floor(y0 - my)), max(0, math.floor(x0 - mx)),
                min(limit_y, math.ceil(y1 + my)), min(limit_x, math.ceil(x1 + mx)))

    def to_original(self, embedding: Embedding, low_res: LowResMask, box: Box | None,
                     points: tuple[Point, ...], calibration: Calibration | None) -> Mask:
        """Bilinear resampling of the window's logits onto the original pixels it covers; threshold 0."""
        height, width = embedding.original_size
        low_res_per_input = UPSCALE * embedding.grid_per_input
        sy, sx = embedding.input_scale
        ry, rx = sy * low_res_per_input, sx * low_res_per_input  # low-res pixels per original pixel
        ph, pw = low_res.logits.shape
        y0, y1 = max(0, math.floor(low_res.y0 / ry)), min(height, math.ceil((low_res.y0 + ph) / ry))
        x0, x1 = max(0, math.floor(low_res.x0 / rx)), min(width, math.ceil((low_res.x0 + pw) / rx))
        device = low_res.logits.device
        ys = ((torch.arange(y0, y1, device=device) + 0.5) * ry - low_res.y0) * (2 / ph) - 1
        xs = ((torch.arange(x0, x1, device=device) + 0.5) * rx - low_res.x0) * (2 / pw) - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).unsqueeze(0)
        logits = F.grid_sample(low_res.logits.float()[None, None], grid.float(), mode="bilinear",
                               padding_mode="border", align_corners=False)[0, 0]
        crop = (logits > 0).cpu().numpy()
        label = box.label if box is not None else next((p.label for p in points if p.label), None)
        box_area = (box.x1 - box.x0) * (box.y1 - box.y0) if box is not None else None
        quality = measure_quality(logits, crop, low_res.iou, box_area)
        score = expected_iou(quality)
        return Mask(crop=crop, x0=x0, y0=y0, image_size=(height, width), label=label, quality=quality,
                    score=calibration(score) if calibration is not None else score)
