"""SAM model families behind one seam (`base.ModelFamily`); the variant table says which family builds which name.

Adding a family = one module here with a `ModelFamily` subclass and a `load(variant, checkpoint, expected_sha256,
device)` function, plus its rows in `FAMILY_OF_VARIANT`. Geometry lives in `trainer.frame` (one `Frame` per image).

How the current core moves onto the seam (phase 2; SAM 1 becomes `families/sam1.py`, wrapping today's
`models.build_network`, `runtime.preprocess` and the windowed `decoder.py`, with resize "longest"):
- models.py: `load_model` -> `families.load_family`; `LoadedModel` gives way to the `ModelFamily` instance
  (`identity.encoder` keeps today's "<variant>-<sha12>" string, so registry manifests and cache folders stay valid).
- types.py: `Embedding` -> `base.ImageEmbedding` (named maps + `Frame`); `box_to_input`, `point_to_input`,
  `input_scale`, `grid_per_input` move to `Frame` (they are there already).
- runtime.py: `Segmenter` holds a family. `embed` = `family.embed` under autocast/inference_mode; `decode` turns
  `Prompts` into `DecodeRequest`s (one per box, windows from `Frame.grid_window`), calls `family.decode`, and maps
  each `LowResLogits` with `Frame.low_res_to_original` before `measure_quality` (object_score joins the signals
  where present); `_to_original` and `grid_window` go; `fine_tuned_decoder` -> `family.decoder_copy(state)`.
- cache.py: `DiskEmbeddings.put/get` write `embedding.tensors()` + `embedding.metadata()` and read with
  `ImageEmbedding.from_tensors` (old files: one "features" map, read as SAM 1); `nbytes` counts every map.
- finetune.py: `decoder_copy(segmenter.model.sam.mask_decoder, ...)` -> `family.decoder_copy(start, trainable=True)`;
  the optimizer takes `family.trainable_parameters(decoder)`; `window_forward` -> `family.decode` with windows
  (grad on); `low_res_target` -> `Frame.mask_to_low_res`; `sam_forward` (the full-frame recipe) -> `decode` with
  window None; the manifest's `base_model` -> `family.identity.as_dict()`.
- registry.py: `write_version(state, manifest, metadata=family.decoder_metadata())` stores the header;
  `load_decoder` returns it, and `active.py` calls `family.check_decoder_metadata` besides `check_base_model`.
- active.py: `ServedDecoder.module: torch.nn.Module`; loads with `family.decoder_copy(state)`.
- ml_backend/prewarm.py: hooks `segmenter.family.encoder_blocks()` instead of walking `sam.image_encoder`.
- edge (settings/backend): `SAM_MODEL` accepts every name of `FAMILY_OF_VARIANT`; `model_version` keeps
  "<identity.encoder>@<decoder version>", so versions of two families never meet.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from .base import DecodeRequest, FamilyIdentity, FamilyLoadError, ImageEmbedding, LowResLogits, ModelFamily

FAMILY_OF_VARIANT: dict[str, str] = {  # variant name (SAM_MODEL) -> module of this package that loads it
    "sam2.1_hiera_tiny": "sam2",
    "sam2.1_hiera_small": "sam2",
    "sam2.1_hiera_base_plus": "sam2",
    "sam2.1_hiera_large": "sam2",
}


def load_family(variant: str, checkpoint: str | Path, expected_sha256: str | None = None,
                device: str = "cpu") -> ModelFamily:
    """The loaded model of a named variant; FamilyLoadError (a ModelLoadError) names what does not fit."""
    module = FAMILY_OF_VARIANT.get(variant)
    if module is None:
        raise FamilyLoadError(f"unknown model {variant!r}; choose one of {', '.join(FAMILY_OF_VARIANT)}")
    return importlib.import_module(f".{module}", __name__).load(variant, checkpoint, expected_sha256, device)


__all__ = ["DecodeRequest", "FAMILY_OF_VARIANT", "FamilyIdentity", "FamilyLoadError", "ImageEmbedding",
           "LowResLogits", "ModelFamily", "load_family"]
