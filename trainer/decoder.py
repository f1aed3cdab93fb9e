"""SAM's mask decoder forward, rearranged for many boxes on one image.

Numerically the same network as `segment_anything.modeling.MaskDecoder` (tests compare them), but:
- the first transformer layer's projections of the image tokens are the same for every box of an
  image, so they are computed once per image (`ImageTokens`);
- the mask upscaling convolutions are pixel-local (2x2 stride-2 transposed convs, per-pixel norm),
  so they run only on the grid cells around the box instead of the whole 64x64 grid.
Serving (`Segmenter.decode`) and fine-tuning (`finetune.window_forward`) both run it, so training optimises
exactly the masks that are served (background outside the box's window), at about half the cost of a step
through SAM's own forward.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder
from segment_anything.modeling.transformer import Attention

UPSCALE = 4  # low-res mask pixels per grid cell: two stride-2 transposed convolutions


@dataclass(frozen=True)
class ImageTokens:
    """Per-image work shared by all boxes. keys/key_pe: (1, HW, C); k0/v0/q0: layer-0 projections."""

    keys: torch.Tensor
    key_pe: torch.Tensor
    k0: torch.Tensor
    v0: torch.Tensor
    q0: torch.Tensor
    grid: tuple[int, int]

    def window(self, window: tuple[int, int, int, int]) -> "ImageTokens":
        """Only the grid cells of `window` (gy0, gx0, gy1, gx1), as if the image were that crop of the grid: a
        decode on it costs in proportion to the window's cells and approximates the whole image's (the prompt
        tokens no longer see the cells outside). For ranking many candidate prompts cheaply (`trainer.clicks`)."""
        gy0, gx0, gy1, gx1 = window
        width = self.grid[1]
        rows = torch.arange(gy0, gy1, device=self.keys.device)[:, None] * width
        cells = (rows + torch.arange(gx0, gx1, device=self.keys.device)[None, :]).reshape(-1)
        return ImageTokens(*(t[:, cells] for t in (self.keys, self.key_pe, self.k0, self.v0, self.q0)),
                           grid=(gy1 - gy0, gx1 - gx0))


@dataclass(frozen=True)
class LowResMask:
    """Mask logits of one prompt on a window of the low-res (4x grid) frame, top-left at (y0, x0)."""

    logits: torch.Tensor
    y0: int
    x0: int
    iou: float


def prepare_image(decoder: MaskDecoder, prompt_encoder: PromptEncoder, features: torch.Tensor,
                  mask_input: torch.Tensor | None = None) -> ImageTokens:
    """features (1, C, h, w) -> the image tokens and the layer-0 projections every prompt shares.

    mask_input: (1, 1, 4h, 4w) low-res logits of a previous step fed back as the dense prompt (SAM's interactive
    loop); None: no mask prompt."""
    _, c, h, w = features.shape
    if mask_input is None:
        dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    else:
        dense = prompt_encoder.mask_downscaling(mask_input)
    keys = (features + dense).flatten(2).permute(0, 2, 1)
    key_pe = prompt_encoder.get_dense_pe().flatten(2).permute(0, 2, 1)
    layer0 = decoder.transformer.layers[0]
    return ImageTokens(
        keys=keys, key_pe=key_pe,
        k0=layer0.cross_attn_token_to_image.k_proj(keys + key_pe),
        v0=layer0.cross_attn_token_to_image.v_proj(keys),
        q0=layer0.cross_attn_image_to_token.q_proj(keys + key_pe),
        grid=(h, w),
    )


def _attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention on already-projected q (B, Nq, D), k/v (B, Nk, D) -> out_proj output (B, Nq, C)."""
    heads = attn.num_heads

    def split(x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, heads, d // heads).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    out = (weights @ v).transpose(1, 2)
    return attn.out_proj(out.reshape(out.shape[0], out.shape[1], -1))


def _full_attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _attend(attn, attn.q_proj(q), attn.k_proj(k), attn.v_proj(v))


def _transformer(decoder: MaskDecoder, image: ImageTokens, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, T, C) -> (queries (B, T, C), keys (B, HW, C)); TwoWayTransformer with shared layer 0."""
    transformer = decoder.transformer
    b = tokens.shape[0]
    first, *rest = transformer.layers
    query_pe, key_pe = tokens, image.key_pe

    # Layer 0 (no positional encoding on the self-attention; image-side projections precomputed).
    queries = first.norm1(_full_attend(first.self_attn, tokens, tokens, tokens))
    q = first.cross_attn_token_to_image.q_proj(queries + query_pe)
    queries = first.norm2(queries + _attend(first.cross_attn_token_to_image, q, image.k0.expand(b, -1, -1),
                                            image.v0.expand(b, -1, -1)))
    queries = first.norm3(queries + first.mlp(queries))
    i2t = first.cross_attn_image_to_token
    out = _attend(i2t, image.q0.expand(b, -1, -1), i2t.k_proj(queries + query_pe), i2t.v_proj(queries))
    keys = first.norm4(image.keys + out)

    for layer in rest:
        q = queries + query_pe
        queries = layer.norm1(queries + _full_attend(layer.self_attn, q, q, queries))
        queries = layer.norm2(queries + _full_attend(layer.cross_attn_token_to_image, queries + query_pe,
                                                     keys + key_pe, keys))
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(keys + _full_attend(layer.cross_attn_image_to_token, keys + key_pe,
                                               queries + query_pe, queries))

    out = _full_attend(transformer.final_attn_token_to_image, queries + query_pe, keys + key_pe, keys)
    return transformer.norm_final_attn(queries + out), keys


def window_logits(decoder: MaskDecoder, image: ImageTokens, sparse: torch.Tensor,
                  windows: list[tuple[int, int, int, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """sparse (B, N, C) prompt embeddings, one grid window (gy0, gx0, gy1, gx1) per prompt ->
    the single-mask (multimask off) logits of each prompt on its window of the low-res frame
    (UPSCALE (gy1 - gy0), UPSCALE (gx1 - gx0)), and the predicted IoUs (B,). Differentiable (fine-tuning uses it).
    """
    b = sparse.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)
    queries, keys = _transformer(decoder, image, tokens)
    iou = decoder.iou_prediction_head(queries[:, 0, :])[:, 0]
    hyper = decoder.output_hypernetworks_mlps[0](queries[:, 1, :])  # (B, C/8)
    h, w = image.grid
    src = keys.transpose(1, 2).reshape(b, -1, h, w)
    logits = []
    for i, (gy0, gx0, gy1, gx1) in enumerate(windows):
        upscaled = decoder.output_upscaling(src[i : i + 1, :, gy0:gy1, gx0:gx1])  # (1, C/8, 4 gh, 4 gw)
        logits.append(torch.einsum("c,chw->hw", hyper[i], upscaled[0]))
    return logits, iou


def decode_windows(decoder: MaskDecoder, image: ImageTokens, sparse: torch.Tensor,
                   windows: list[tuple[int, int, int, int]]) -> list[LowResMask]:
    """Like `window_logits`, as one `LowResMask` per prompt (window origin in low-res pixels)."""
    logits, iou = window_logits(decoder, image, sparse, windows)
    return [LowResMask(logits=l, y0=gy0 * UPSCALE, x0=gx0 * UPSCALE, iou=float(iou[i]))
            for i, (l, (gy0, gx0, _, _)) in enumerate(zip(logits, windows))]


def decode_multimask(decoder: MaskDecoder, image: ImageTokens, sparse: torch.Tensor,
                     window: tuple[int, int, int, int]) -> list[LowResMask]:
    """sparse (1, N, C) one prompt -> SAM's three multimask outputs (mask tokens 1-3) on `window`, as
    `MaskDecoder(..., multimask_output=True)` gives them: for an ambiguous prompt (one click) SAM picks the one
    with the highest predicted IoU."""
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0), sparse], dim=1)
    queries, keys = _transformer(decoder, image, tokens)
    iou = decoder.iou_prediction_head(queries[:, 0, :])[0]
    gy0, gx0, gy1, gx1 = window
    h, w = image.grid
    upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(1, -1, h, w)[:, :, gy0:gy1, gx0:gx1])[0]
    masks = []
    for output in range(1, decoder.num_mask_tokens):
        hyper = decoder.output_hypernetworks_mlps[output](queries[0, 1 + output, :])
        masks.append(LowResMask(logits=torch.einsum("c,chw->hw", hyper, upscaled), y0=gy0 * UPSCALE,
                                x0=gx0 * UPSCALE, iou=float(iou[output])))
    return masks


def decoder_copy(decoder: MaskDecoder, state: dict[str, torch.Tensor] | None = None,
                 trainable: bool = False) -> MaskDecoder:
    """A deep copy of a mask decoder, with `state` loaded (strict: every tensor must fit) when given; in train
    mode with gradients when `trainable`, else in eval mode, frozen. The one way decoders are copied."""
    module = copy.deepcopy(decoder)
    if state is not None:
        module.load_state_dict(state, strict=True)
    for parameter in module.parameters():
        parameter.requires_grad_(trainable)
    return module.train(trainable)
