"""SAM 2.1 (Hiera tiny / small / base+ / large) behind the family seam, on Hugging Face `transformers`' Sam2Model.

Weights: the model directory of the Hugging Face repository (`facebook/sam2.1-hiera-tiny`, ...: config.json +
model.safetensors, downloaded once by the user), or its model.safetensors alone. They hold the video model's
weights; the image model uses the encoder, prompt encoder and mask decoder, and the video-only tensors tell the
generation apart (SAM 2.1 added `occlusion_spatial_embedding_parameter` and
`temporal_positional_encoding_projection_layer`; Meta's names: `no_obj_embed_spatial`, `obj_ptr_tpos_proj`).
A checkpoint of another generation, size or family is refused with a message naming what it is and what the
variant needs. Nothing is downloaded: the network is built from the variant's own config (`Sam2Config`).

Embedding: "features" (1, 256, 64, 64, with the no-memory embedding added), "high_res_s1" (1, 64, 128, 128) and
"high_res_s0" (1, 32, 256, 256), the high-resolution maps already through the decoder's conv_s1/conv_s0 (as the
library caches them); those two convolutions therefore count as encoder: frozen in fine-tuning, so one cached
embedding serves every fine-tuned version.

Why transformers and not Meta's `sam2` package: transformers 5.23 installs as a wheel next to torch 2.14.1 / numpy
2.2.6 on Python 3.11, builds any size from a config (tests run a tiny random model through the same classes as the
real one), reads safetensors without pickle, and holds SAM-HQ / EdgeTAM / SAM 3 in the same shape for later rows.
`sam2` 1.1.0 is a source-only package whose build compiles a CUDA extension against torch (pip's isolated build
fetches a second torch), configures models through hydra YAML, and reads .pt pickles.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..frame import UPSCALE
from ..models import file_sha256
from .base import DecodeRequest, FamilyIdentity, FamilyLoadError, ImageEmbedding, LowResLogits, ModelFamily, \
    check_image
from .sam2_decoder import ImageTokens, prepare_image, window_logits

FAMILY = "sam2.1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GENERATION_2_1_KEYS = ("occlusion_spatial_embedding_parameter", "temporal_positional_encoding_projection_layer.",
                       "no_obj_embed_spatial", "obj_ptr_tpos_proj.")
VIDEO_ONLY = re.compile(r"^(memory_|mask_downsample|object_pointer_proj|temporal_positional_encoding_projection_layer"
                        r"|no_memory_positional_encoding|no_object_pointer|occlusion_spatial_embedding_parameter)")


@dataclass(frozen=True)
class Sam2Variant:
    """One SAM 2.x network: its Hiera backbone and where its official weights come from.

    backbone: `Sam2HieraDetConfig` fields; vision/prompt_encoder/mask_decoder: overrides of the other sub-configs
    (tests build tiny random networks this way)."""

    name: str
    generation: str  # "2.1" or "2"
    backbone: dict
    hf_repo: str = ""
    vision: dict = field(default_factory=dict)
    prompt_encoder: dict = field(default_factory=dict)
    mask_decoder: dict = field(default_factory=dict)

    def config(self):
        from transformers import Sam2Config

        channels = list(reversed(self.backbone.get("embed_dim_per_stage", [96, 192, 384, 768])))
        vision = {"backbone_config": {"model_type": "sam2_hiera_det_model", **self.backbone},
                  "backbone_channel_list": channels, **self.vision}
        return Sam2Config(vision_config=vision, prompt_encoder_config=dict(self.prompt_encoder),
                          mask_decoder_config=dict(self.mask_decoder))


VARIANTS: dict[str, Sam2Variant] = {
    "sam2.1_hiera_tiny": Sam2Variant("sam2.1_hiera_tiny", "2.1", {}, "facebook/sam2.1-hiera-tiny"),
    "sam2.1_hiera_small": Sam2Variant("sam2.1_hiera_small", "2.1",
                                      {"blocks_per_stage": [1, 2, 11, 2], "global_attention_blocks": [7, 10, 13]},
                                      "facebook/sam2.1-hiera-small"),
    "sam2.1_hiera_base_plus": Sam2Variant(
        "sam2.1_hiera_base_plus", "2.1",
        {"hidden_size": 112, "embed_dim_per_stage": [112, 224, 448, 896],
         "num_attention_heads_per_stage": [2, 4, 8, 16], "blocks_per_stage": [2, 3, 16, 3],
         "global_attention_blocks": [12, 16, 20],
         "window_positional_embedding_background_size": [14, 14]}, "facebook/sam2.1-hiera-base-plus"),
    "sam2.1_hiera_large": Sam2Variant(
        "sam2.1_hiera_large", "2.1",
        {"hidden_size": 144, "embed_dim_per_stage": [144, 288, 576, 1152],
         "num_attention_heads_per_stage": [2, 4, 8, 16], "blocks_per_stage": [2, 6, 36, 4],
         "global_attention_blocks": [23, 33, 43],
         "window_positional_embedding_background_size": [7, 7], "window_size_per_stage": [8, 4, 16, 8]},
        "facebook/sam2.1-hiera-large"),
}


# -- reading and checking a checkpoint ----------------------------------------------------------------------
def _weights_file(path: Path) -> tuple[Path, dict | None]:
    """The safetensors file and the config.json beside it (None when there is none)."""
    if path.is_dir():
        weights = path / "model.safetensors"
        if not weights.is_file():
            found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
            raise FamilyLoadError(f"model directory {path} has no model.safetensors (it holds {found})")
    else:
        weights = path
    if not weights.is_file():
        raise FamilyLoadError(f"checkpoint not found: {path}")
    config_path = weights.parent / "config.json"
    config = None
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FamilyLoadError(f"{config_path} is not readable JSON: {exc}") from exc
    return weights, config


def _read_state(weights: Path) -> dict[str, torch.Tensor]:
    """The file's tensors: safetensors, or a torch pickle (read safely, to say what it is when it is refused)."""
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(weights))
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # any decoding failure is a bad checkpoint file
        raise FamilyLoadError(f"cannot read checkpoint {weights.name}: {exc}") from exc
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state if isinstance(state, dict) else {}


def _generation(state: dict) -> str:
    return "2.1" if any(k.startswith(GENERATION_2_1_KEYS) for k in state) else "2"


def _describe(state: dict) -> str:
    """What a state dict is, in words: 'SAM 2.1 weights (Hiera with 12 blocks)', 'a SAM 1 checkpoint', ..."""
    keys = list(state)
    if any(k.startswith("vision_encoder.backbone.") for k in keys):
        blocks = {int(m.group(1)) for k in keys if (m := re.match(r"vision_encoder\.backbone\.blocks\.(\d+)\.", k))}
        return f"SAM {_generation(state)} weights ({_size_name(len(blocks))})"
    if any(k.startswith("image_encoder.trunk.") for k in keys):
        return f"a SAM {_generation(state)} checkpoint in Meta's sam2 .pt layout"
    if any(k.startswith(("image_encoder.", "mask_decoder.output_upscaling")) for k in keys):
        return "a SAM 1 checkpoint (segment-anything layout)"
    return "not a SAM checkpoint"


def _size_name(blocks: int) -> str:
    sizes = [name for name, v in VARIANTS.items() if sum(v.backbone.get("blocks_per_stage", [1, 2, 7, 2])) == blocks]
    return f"Hiera with {blocks} blocks" + (f", like {sizes[0].split('_', 1)[1]}" if sizes else "")


def check_state(state: dict, variant: Sam2Variant, name: str, config: dict | None = None) -> None:
    """Refuse weights of another family or generation, naming what the file is and what the variant needs."""
    described = _describe(state)
    if not any(k.startswith("vision_encoder.backbone.") for k in state):
        raise FamilyLoadError(f"checkpoint {name} is {described}, but {variant.name} needs SAM {variant.generation} "
                              f"weights in the Hugging Face layout (the model directory of {variant.hf_repo}: "
                              "config.json + model.safetensors)")
    if not any(VIDEO_ONLY.match(k) for k in state):
        raise FamilyLoadError(f"checkpoint {name} holds no video-memory weights, so SAM 2 and SAM 2.1 cannot be told "
                              f"apart; {variant.name} reads the official model directory ({variant.hf_repo})")
    if _generation(state) != variant.generation:
        raise FamilyLoadError(f"checkpoint {name} holds {described}, but {variant.name} needs SAM "
                              f"{variant.generation} weights ({variant.hf_repo})")
    if config is not None:
        declared = "2.1" if config.get("enable_occlusion_spatial_embedding", True) else "2"
        if config.get("model_type") not in ("sam2", "sam2_video") or declared != _generation(state):
            raise FamilyLoadError(f"config.json beside {name} declares model_type {config.get('model_type')!r} "
                                  f"(SAM {declared}), but its weights are {described}")


def build_model(variant: Sam2Variant, state: dict[str, torch.Tensor], name: str):
    """The image model of the variant with the checkpoint's encoder, prompt encoder and mask decoder (strict:
    every tensor of the image model must be in the file with its shape; extra ones only video-only)."""
    from transformers import Sam2Model

    model = Sam2Model(variant.config())
    image_keys = model.state_dict()
    missing = [k for k in image_keys if k not in state]
    wrong = [k for k in image_keys if k in state and state[k].shape != image_keys[k].shape]
    unexpected = [k for k in state if k not in image_keys and not VIDEO_ONLY.match(k)]
    if missing or wrong or unexpected:
        detail = "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for label, keys in (("missing", missing), ("wrong shape", wrong),
                                               ("unexpected", unexpected)) if keys)
        raise FamilyLoadError(f"checkpoint {name} holds {_describe(state)}, which does not fit {variant.name} "
                              f"({detail})")
    model.load_state_dict({k: state[k] for k in image_keys}, strict=True)
    return model


# -- the family ---------------------------------------------------------------------------------------------
class Sam2Family(ModelFamily):
    """A loaded SAM 2.x image model behind the seam (see the module docstring for the embedding's maps)."""

    resize = "stretch"

    def __init__(self, model, variant: Sam2Variant, weights_sha256: str) -> None:
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.variant = variant
        self.identity = FamilyIdentity(FAMILY if variant.generation == "2.1" else "sam2", variant.name,
                                       weights_sha256)
        prompt = model.prompt_encoder
        self.input_size = int(prompt.input_image_size)
        self.grid_size = int(prompt.image_embedding_size[0])
        with torch.no_grad():
            self.image_pe = model.get_image_wide_positional_embeddings()  # (1, C, G, G)
        device = self.device
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- encoder ----------------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 images -> (N, 3, S, S): each resized to S x S (bilinear, antialiased, on uint8 as the library's
        image processor does), scaled to [0, 1], ImageNet-normalised."""
        from torchvision.transforms.v2 import functional as tvF

        batch = []
        for image in images:
            check_image(image)
            x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)
            x = tvF.resize(x, [self.input_size, self.input_size], interpolation=tvF.InterpolationMode.BILINEAR,
                           antialias=True)
            batch.append((x.float() / 255.0 - self.mean) / self.std)
        return torch.stack(batch)

    def embed(self, image: np.ndarray) -> ImageEmbedding:
        return self.embed_many([image])[0]

    def embed_many(self, images: Sequence[np.ndarray]) -> list[ImageEmbedding]:
        pixels = self.preprocess(images)
        with torch.no_grad():
            s0, s1, features = self.model.get_image_embeddings(pixels)
        return [ImageEmbedding({"features": features[i:i + 1].float().clone(),
                                "high_res_s1": s1[i:i + 1].float().clone(),
                                "high_res_s0": s0[i:i + 1].float().clone()}, self.frame(image.shape[:2]))
                for i, image in enumerate(images)]

    def encoder_blocks(self) -> Sequence[torch.nn.Module]:
        return list(self.model.vision_encoder.backbone.blocks)

    # -- decoder ----------------------------------------------------------------------------------------------
    @property
    def base_decoder(self) -> torch.nn.Module:
        return self.model.mask_decoder

    def trainable_parameters(self, decoder: torch.nn.Module) -> list[torch.nn.Parameter]:
        """All but conv_s0/conv_s1: they run at embed time (their output is cached), so they belong to the encoder."""
        return [p for n, p in decoder.named_parameters() if not n.startswith(("conv_s0.", "conv_s1."))]

    def _sparse(self, embedding: ImageEmbedding, request: DecodeRequest) -> torch.Tensor:
        """The request's prompt tokens (T, C): clicks (labels 1/0) and/or the box's two corners."""
        frame, device = embedding.frame, self.device
        points = labels = boxes = None
        if request.points:
            points = torch.tensor([[[frame.point_to_input(p) for p in request.points]]], device=device)
            labels = torch.tensor([[[1 if p.positive else 0 for p in request.points]]], device=device)
        if request.box is not None:
            boxes = torch.tensor([[frame.box_to_input(request.box)]], device=device)
        with torch.no_grad():
            sparse, _ = self.model.prompt_encoder(points, labels, boxes, None)
        return sparse[0, 0]

    def _dense(self, mask_input: torch.Tensor | None) -> torch.Tensor:
        prompt = self.model.prompt_encoder
        if mask_input is None:
            return prompt.no_mask_embed.weight.reshape(1, -1, 1, 1)
        size = prompt.mask_input_size
        if tuple(mask_input.shape[-2:]) != tuple(size):
            raise ValueError(f"mask input must be low-res logits {tuple(size)}, got {tuple(mask_input.shape)}")
        with torch.no_grad():
            return prompt.mask_embed(mask_input.reshape(1, 1, *size).to(self.device, torch.float32))

    def decode(self, embedding: ImageEmbedding, requests: Sequence[DecodeRequest],
               decoder: torch.nn.Module | None = None) -> list[LowResLogits]:
        decoder = decoder or self.base_decoder
        embedding = embedding.to(self.device)
        frame = embedding.frame
        high_res = (embedding.maps["high_res_s1"], embedding.maps["high_res_s0"])
        shared: ImageTokens | None = None
        groups: dict[tuple, list[int]] = {}  # requests that can run as one batch: same token count, no mask input
        sparse = [self._sparse(embedding, r) for r in requests]
        for i, request in enumerate(requests):
            key = ("mask", i) if request.mask_input is not None else ("shared", sparse[i].shape[0])
            groups.setdefault(key, []).append(i)
        out: list[LowResLogits | None] = [None] * len(requests)
        for (kind, _), indices in groups.items():
            if kind == "shared":
                shared = shared or prepare_image(decoder, embedding.features, self._dense(None), self.image_pe)
                image = shared
            else:
                image = prepare_image(decoder, embedding.features, self._dense(requests[indices[0]].mask_input),
                                      self.image_pe)
            windows = [requests[i].window or frame.grid_window(None) for i in indices]
            logits, ious, objects = window_logits(decoder, image, torch.stack([sparse[i] for i in indices]),
                                                  high_res, windows)
            for j, i in enumerate(indices):
                gy0, gx0 = windows[j][0], windows[j][1]
                out[i] = LowResLogits(logits[j], UPSCALE * gy0, UPSCALE * gx0, ious[j], float(objects[j].detach()))
        return out


def load(variant: str | Sam2Variant, checkpoint: str | Path, expected_sha256: str | None = None,
         device: str = "cpu") -> Sam2Family:
    """Build the variant and load its checkpoint (a model directory or its model.safetensors); the sha256 of the
    weights file is checked before loading when given."""
    spec = VARIANTS.get(variant) if isinstance(variant, str) else variant
    if spec is None:
        raise FamilyLoadError(f"unknown SAM 2 variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    weights, config = _weights_file(Path(checkpoint))
    sha256 = file_sha256(weights)
    if expected_sha256 and not sha256.startswith(expected_sha256.lower()):
        raise FamilyLoadError(f"checkpoint {weights.name} has sha256 {sha256[:12]}…, "
                              f"expected {expected_sha256[:12]}…")
    state = _read_state(weights)
    name = f"{weights.parent.name}/{weights.name}" if weights.parent.name else weights.name
    check_state(state, spec, name, config)
    model = build_model(spec, state, name)
    return Sam2Family(model.to(device), spec, sha256)
