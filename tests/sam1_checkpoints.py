"""Random-weight SAM 1 checkpoints in the official file layout, for tests of the variants no real weights exist for
here (vit_b/l/h, MobileSAM).

The official files (sam_vit_b_01ec64.pth, mobile_sam.pt, ...) are `torch.save` of the `Sam` module's state dict:
image_encoder.* / prompt_encoder.* / mask_decoder.* tensors, no wrapper dict, no pixel_mean/std (non-persistent).
An official name carries its sha256 prefix, which `trainer.models.load_model` checks, so a random file is written
under a name of its own ("sam_vit_b_random.pth") and loaded with its real sha256 (what SAM_CHECKPOINT_SHA256 says).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from trainer.models import build_network, file_sha256

OFFICIAL_NAMES = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth",
                  "mobile_sam": "mobile_sam.pt"}


def random_name(variant: str) -> str:
    """The official file name with "random" in place of its sha256 prefix (or before the suffix)."""
    official = Path(OFFICIAL_NAMES[variant])
    stem = official.stem.rsplit("_", 1)[0] if variant.startswith("vit_") else official.stem
    return f"{stem}_random{official.suffix}"


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random at a scale that keeps activations O(1): fan-in scaled weights, norms near 1.

    Two changes make random masks look like masks (SamPredictor resamples the low-res logits in two steps, we in
    one: the same logits give the same masks up to their edges, so masks must not be all edges):
    - the mask decoder's 2x2 transposed convolutions get one value per channel pair for all four kernel positions
      (with four independent values each low-res pixel differs from its neighbour: every mask is a lattice);
    - the hypernetworks' output layers are zero-mean over channels, so no common offset makes every mask full."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.named_parameters():
            noise = torch.randn(tensor.shape, generator=generator)
            if tensor.ndim >= 2:
                tensor.copy_(noise / math.sqrt(tensor[0].numel()))
            else:
                tensor.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
        for layer in module.modules():
            if isinstance(layer, torch.nn.ConvTranspose2d):
                layer.weight.copy_(layer.weight.mean(dim=(2, 3), keepdim=True).expand_as(layer.weight))
        for name, layer in module.named_modules():
            if name.startswith("mask_decoder.output_hypernetworks_mlps.") and name.endswith("layers.2"):
                layer.weight.sub_(layer.weight.mean(dim=0, keepdim=True))
                layer.bias.sub_(layer.bias.mean())


def write_random_checkpoint(variant: str, directory: Path, seed: int = 0) -> tuple[Path, str]:
    """A random-weight checkpoint of `variant` in the official layout -> (its path, its sha256)."""
    torch.manual_seed(seed)  # buffers (the prompt encoder's random Fourier features) use the global generator
    sam, _, _ = build_network(variant)
    randomize(sam, seed)
    path = Path(directory) / random_name(variant)
    torch.save(sam.state_dict(), path)
    return path, file_sha256(path)
