"""SAM 2's mask decoder forward (transformers' `Sam2MaskDecoder`), rearranged for many prompts on one image.

Numerically the same network as the library's forward (tests/test_sam2_family.py compares them), but:
- the first transformer layer's projections of the image tokens are the same for every prompt without a mask
  input, so they are computed once per image (`ImageTokens`), and all such prompts run as one batch;
- the mask upscaling (2x2 stride-2 transposed convolutions, a per-pixel norm, the high-resolution features added
  pixel by pixel) is pixel-local, so it runs only on the grid window a prompt can touch; each high-resolution map
  is sliced to the same window at its own resolution.
The single-mask choice is the library's: token 0, unless (in eval mode) its stability falls below the threshold,
then the best of the three multimask outputs by predicted IoU (`dynamic_multimask_via_stability`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..frame import UPSCALE


@dataclass(frozen=True)
class ImageTokens:
    """Per-image work shared by prompts. keys/key_pe: (1, HW, C); k0/v0/q0: layer-0 projections; grid: (h, w)."""

    keys: torch.Tensor
    key_pe: torch.Tensor
    k0: torch.Tensor
    v0: torch.Tensor
    q0: torch.Tensor
    grid: tuple[int, int]


def prepare_image(decoder: nn.Module, features: torch.Tensor, dense: torch.Tensor,
                  image_pe: torch.Tensor) -> ImageTokens:
    """features (1, C, h, w) + dense prompt embedding (1, C, h, w) and the image-wide positional embedding
    (1, C, h, w) -> the image tokens and the layer-0 projections every prompt shares."""
    _, _, h, w = features.shape
    keys = (features + dense).flatten(2).transpose(1, 2)
    key_pe = image_pe.flatten(2).transpose(1, 2)
    layer0 = decoder.transformer.layers[0]
    return ImageTokens(keys=keys, key_pe=key_pe,
                       k0=layer0.cross_attn_token_to_image.k_proj(keys + key_pe),
                       v0=layer0.cross_attn_token_to_image.v_proj(keys),
                       q0=layer0.cross_attn_image_to_token.q_proj(keys + key_pe), grid=(h, w))


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`Sam2Attention` on already-projected q (B, Nq, D), k/v (B, Nk, D) -> its output projection (B, Nq, C)."""
    heads = attn.num_attention_heads

    def split(x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, heads, d // heads).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), scale=attn.scaling)
    out = out.transpose(1, 2)
    return attn.o_proj(out.reshape(out.shape[0], out.shape[1], -1))


def _full_attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _attend(attn, attn.q_proj(q), attn.k_proj(k), attn.v_proj(v))


def _transformer(decoder: nn.Module, image: ImageTokens, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, T, C) -> (queries (B, T, C), keys (B, HW, C)): `Sam2TwoWayTransformer` with a shared layer 0."""
    transformer = decoder.transformer
    b = tokens.shape[0]
    first, *rest = transformer.layers
    query_pe, key_pe = tokens, image.key_pe

    # Layer 0: no positional encoding on the self-attention, no residual around it; image-side projections shared.
    queries = first.layer_norm1(_full_attend(first.self_attn, tokens, tokens, tokens))
    q = first.cross_attn_token_to_image.q_proj(queries + query_pe)
    queries = first.layer_norm2(queries + _attend(first.cross_attn_token_to_image, q, image.k0.expand(b, -1, -1),
                                                  image.v0.expand(b, -1, -1)))
    queries = first.layer_norm3(queries + first.mlp(queries))
    i2t = first.cross_attn_image_to_token
    out = _attend(i2t, image.q0.expand(b, -1, -1), i2t.k_proj(queries + query_pe), i2t.v_proj(queries))
    keys = first.layer_norm4(image.keys + out)

    for layer in rest:
        q = queries + query_pe
        queries = layer.layer_norm1(queries + _full_attend(layer.self_attn, q, q, queries))
        queries = layer.layer_norm2(queries + _full_attend(layer.cross_attn_token_to_image, queries + query_pe,
                                                           keys + key_pe, keys))
        queries = layer.layer_norm3(queries + layer.mlp(queries))
        keys = layer.layer_norm4(keys + _full_attend(layer.cross_attn_image_to_token, keys + key_pe,
                                                     queries + query_pe, queries))

    out = _full_attend(transformer.final_attn_token_to_image, queries + query_pe, keys + key_pe, keys)
    return transformer.layer_norm_final_attn(queries + out), keys


def _upscale(decoder: nn.Module, src: torch.Tensor, s1: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """Grid cells (1, C, gh, gw) + the high-res maps on the same window (1, C/4, 2gh, 2gw), (1, C/8, 4gh, 4gw)
    -> mask features (C/8, 4gh, 4gw)."""
    x = decoder.activation(decoder.upscale_layer_norm(decoder.upscale_conv1(src) + s1))
    return decoder.activation(decoder.upscale_conv2(x) + s0)[0]


def _stability(logits: torch.Tensor, delta: float) -> torch.Tensor:
    """area(logits > delta) / area(logits > -delta), 1 where nothing is above -delta (the library's rule)."""
    inner = (logits > delta).sum().float()
    outer = (logits > -delta).sum().float()
    return torch.where(outer > 0, inner / outer.clamp(min=1), torch.ones_like(outer))


def window_logits(decoder: nn.Module, image: ImageTokens, sparse: torch.Tensor,
                  high_res: tuple[torch.Tensor, torch.Tensor], windows: list[tuple[int, int, int, int]]
                  ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """sparse (B, N, C) prompt embeddings and one grid window (gy0, gx0, gy1, gx1) per prompt; high_res: the
    embedding's (s1 (1, C/4, 2h, 2w), s0 (1, C/8, 4h, 4w)) maps -> per prompt its single-mask logits on its window
    of the low-res frame (UPSCALE gh, UPSCALE gw), the predicted IoUs (B,) and the object-score logits (B,)."""
    b = sparse.shape[0]
    output_tokens = torch.cat([decoder.obj_score_token.weight, decoder.iou_token.weight,
                               decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse.to(output_tokens.dtype)], dim=1)
    queries, keys = _transformer(decoder, image, tokens)
    n_masks = decoder.num_mask_tokens
    iou_all = decoder.iou_prediction_head(queries[:, 1, :])  # (B, n_masks)
    object_score = decoder.pred_obj_score_head(queries[:, 0, :])[:, 0]
    dynamic = decoder.dynamic_multimask_via_stability and not decoder.training
    choices = range(n_masks) if dynamic else range(1)
    hyper = torch.stack([decoder.output_hypernetworks_mlps[i](queries[:, 2 + i, :]) for i in choices], dim=1)
    h, w = image.grid
    src = keys.transpose(1, 2).reshape(b, -1, h, w)
    s1, s0 = high_res
    logits, ious = [], []
    for i, (gy0, gx0, gy1, gx1) in enumerate(windows):
        features = _upscale(decoder, src[i:i + 1, :, gy0:gy1, gx0:gx1], s1[..., 2 * gy0:2 * gy1, 2 * gx0:2 * gx1],
                            s0[..., UPSCALE * gy0:UPSCALE * gy1, UPSCALE * gx0:UPSCALE * gx1])
        masks = torch.einsum("kc,chw->khw", hyper[i], features)
        pick = 0
        if dynamic and _stability(masks[0], decoder.dynamic_multimask_stability_delta) < \
                decoder.dynamic_multimask_stability_thresh:
            pick = 1 + int(torch.argmax(iou_all[i, 1:]))
        logits.append(masks[pick])
        ious.append(iou_all[i, pick])
    return logits, torch.stack(ious), object_score
