"""The model-family seam: what every SAM generation provides, and the plain objects that cross it.

A family (SAM 1 + MobileSAM + LiteMedSAM, SAM 2.1, ...) is one module with a `ModelFamily` subclass. The rest of the
core sees only this file and `trainer.frame`:

- identity: `FamilyIdentity` (family, variant, weights sha256); `identity.encoder` keys the embedding caches and
  is recorded as a fine-tuned version's base model.
- `embed(image) -> ImageEmbedding`: any number of named feature maps ("features" is the one the decoder's
  transformer attends to; SAM 2 adds its two high-resolution maps) and the image's `Frame`.
- `decode(embedding, requests, decoder) -> LowResLogits`: per request (a box, clicks, both, optionally the previous
  low-res logits as mask input, and the decoder-grid window to compute), the single-mask logits on that window of
  the low-res frame, the predicted IoU and, where the family has one, the object score. Differentiable when the
  decoder is trainable and grad is on (fine-tuning runs it); the caller wraps serving in `torch.inference_mode`.
- `base_decoder` / `decoder_copy` / `trainable_parameters` / `decoder_state`: what fine-tuning trains and the
  registry stores (a safetensors state dict with `decoder_metadata()`; `check_decoder_metadata` refuses a state of
  another family, variant or weights before any tensor is loaded).
- `encoder_blocks()`: the modules between which a long encode may pause (pre-warm's yield point).
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..frame import Frame
from ..models import ModelLoadError
from ..types import Box, Point

PRIMARY_MAP = "features"


class FamilyLoadError(ModelLoadError):
    """A checkpoint that does not fit the family/variant asked for (or cannot be read); the message names both."""


@dataclass(frozen=True)
class FamilyIdentity:
    """Which network an embedding or a decoder state belongs to."""

    family: str  # "sam1", "sam2.1", ...
    variant: str  # "vit_b", "sam2.1_hiera_tiny", ...
    weights_sha256: str

    @property
    def encoder(self) -> str:
        """The embedding cache's namespace and a fine-tuned version's base model: variant + weights. Variant names
        are unique across families, so two families never share one (today's `LoadedModel.identity` form)."""
        return f"{self.variant}-{self.weights_sha256[:12]}"

    def as_dict(self) -> dict[str, str]:
        return {"family": self.family, "variant": self.variant, "weights_sha256": self.weights_sha256,
                "identity": self.encoder}


@dataclass(frozen=True)
class ImageEmbedding:
    """An encoder's output for one image: named maps (1, C_i, h_i, w_i) float, the decoder's main map under
    "features", plus the image's frame."""

    maps: dict[str, torch.Tensor]
    frame: Frame

    def __post_init__(self) -> None:
        if PRIMARY_MAP not in self.maps:
            raise ValueError(f"an embedding needs a {PRIMARY_MAP!r} map, got {sorted(self.maps)}")

    @property
    def features(self) -> torch.Tensor:
        return self.maps[PRIMARY_MAP]

    @property
    def nbytes(self) -> int:
        """Bytes of every map (what the memory cache's bound counts)."""
        return sum(t.element_size() * t.nelement() for t in self.maps.values())

    @property
    def device(self) -> torch.device:
        return self.features.device

    def to(self, device: torch.device | str) -> "ImageEmbedding":
        """The same embedding on `device` (itself when it is there already)."""
        device = torch.device(device)
        if all(t.device == device for t in self.maps.values()):
            return self
        return ImageEmbedding({k: t.to(device) for k, t in self.maps.items()}, self.frame)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the disk cache writes (contiguous CPU tensors, safetensors-ready)."""
        return {k: t.contiguous().cpu() for k, t in self.maps.items()}

    def metadata(self) -> dict[str, str]:
        return {**self.frame.metadata(), "maps": ",".join(self.maps)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> "ImageEmbedding":
        """Inverse of `tensors` + `metadata`; reads today's SAM 1 cache files (one "features" map, no frame
        kind) too."""
        names = metadata.get("maps", PRIMARY_MAP).split(",")
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"embedding file lacks maps {missing}")
        maps = {n: tensors[n] for n in names}
        return cls(maps, Frame.from_metadata(metadata, grid_size=maps[PRIMARY_MAP].shape[-1]))


@dataclass(frozen=True)
class DecodeRequest:
    """One mask to decode. box/points in original pixels; mask_input: (L, L) low-res logits of an earlier decode
    of this image (SAM's interactive loop); window: decoder-grid cells (gy0, gx0, gy1, gx1) to compute
    (`Frame.grid_window`), None = the whole grid."""

    box: Box | None = None
    points: tuple[Point, ...] = ()
    mask_input: torch.Tensor | None = None
    window: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.box is None and not self.points:
            raise ValueError("a decode request needs a box or at least one point")


@dataclass(frozen=True)
class LowResLogits:
    """One request's single-mask logits (h, w) on a window of the low-res frame, top-left at (y0, x0) low-res
    pixels; predicted_iou: the IoU head's output (0-dim tensor: differentiable in training); object_score: the
    object-presence logit where the family has that head (SAM 2), else None."""

    logits: torch.Tensor
    y0: int
    x0: int
    predicted_iou: torch.Tensor
    object_score: float | None = None

    @property
    def iou(self) -> float:
        return float(self.predicted_iou)


def check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")


class ModelFamily(ABC):
    """One loaded SAM network of some family, in eval mode with frozen weights, behind the common seam.

    Subclasses set `identity`, `input_size`, `grid_size`, `resize` ("longest" | "stretch", see `trainer.frame`)
    and `box_only`, and implement the abstract methods. No per-image state: threads may share one instance.
    """

    identity: FamilyIdentity
    input_size: int
    grid_size: int
    resize: str
    box_only: bool = False

    # -- geometry -------------------------------------------------------------------------------------------
    def frame(self, original_size: tuple[int, int]) -> Frame:
        """Where an image of original_size (H, W) sits in this model's input and decoder frames."""
        return Frame.for_image(original_size, self.input_size, self.grid_size, self.resize)

    # -- encoder --------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the weights live; inputs are created there."""

    @abstractmethod
    def embed(self, image: np.ndarray) -> ImageEmbedding:
        """RGB uint8 (H, W, 3) -> its embedding (float32 maps on `device`)."""

    def embed_many(self, images: Sequence[np.ndarray]) -> list[ImageEmbedding]:
        """Several images (one encoder forward where the family batches them); the same as `embed` each."""
        return [self.embed(image) for image in images]

    @abstractmethod
    def encoder_blocks(self) -> Sequence[torch.nn.Module]:
        """The encoder's blocks, in order: a forward pre-hook on each is where a long encode may pause."""

    # -- decoder --------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def base_decoder(self) -> torch.nn.Module:
        """The checkpoint's mask decoder (frozen): what fine-tuning copies, and what decodes when none is given."""

    @abstractmethod
    def decode(self, embedding: ImageEmbedding, requests: Sequence[DecodeRequest],
               decoder: torch.nn.Module | None = None) -> list[LowResLogits]:
        """One `LowResLogits` per request, in order; `decoder`: a fine-tuned copy (`decoder_copy`), else the base."""

    def trainable_parameters(self, decoder: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The decoder parameters fine-tuning optimises (default: all of them)."""
        return list(decoder.parameters())

    def decoder_copy(self, state: dict[str, torch.Tensor] | None = None,
                     trainable: bool = False) -> torch.nn.Module:
        """A copy of the base decoder, with `state` loaded strictly (every tensor must fit) when given; in train
        mode with gradients on `trainable_parameters` when `trainable`, else eval mode, frozen."""
        module = copy.deepcopy(self.base_decoder)
        if state is not None:
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise FamilyLoadError(f"decoder state does not fit {self.identity.variant}: {str(exc)[:300]}") from exc
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        if trainable:
            for parameter in self.trainable_parameters(module):
                parameter.requires_grad_(True)
        return module.train(trainable)

    def decoder_state(self, decoder: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The tensors a registry version stores (detached CPU copies)."""
        return {k: v.detach().contiguous().cpu().clone() for k, v in decoder.state_dict().items()}

    def decoder_metadata(self) -> dict[str, str]:
        """Written into a decoder state's safetensors header next to the tensors."""
        return {"family": self.identity.family, "variant": self.identity.variant,
                "base_model": self.identity.encoder}

    def check_decoder_metadata(self, metadata: dict[str, str] | None) -> None:
        """Refuse a decoder state saved for another family, variant or base weights (files written before the
        seam carry no metadata: the registry's manifest check is then the guard)."""
        if not metadata or "base_model" not in metadata:
            return
        ours = self.decoder_metadata()
        if metadata.get("base_model") != ours["base_model"] or metadata.get("family") != ours["family"]:
            raise FamilyLoadError(f"decoder state is for {metadata.get('family')} {metadata.get('base_model')}, "
                                  f"not for {ours['family']} {ours['base_model']}")
