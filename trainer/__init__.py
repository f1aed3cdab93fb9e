"""Model runtime, fine-tuning, checkpoint registry and training jobs for the SAM backend.

The core: no HTTP, no network, no Label Studio JSON (ml_backend/ converts at the edge). Its public names are
below; each is imported on first use (PEP 562), so `import trainer.files` or a command that needs no model
(`python -m ml_backend connect`) does not pay for torch and scipy.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "active": ("ActiveDecoders", "ServedDecoder"),
    "calibration": ("Calibration", "fit_calibration"),
    "clicks": ("ClickMemory",),
    "cache": ("DiskEmbeddings", "EmbeddingCache", "image_key"),
    "data": ("DataError", "Dataset", "ImageSamples", "Sample", "assign_splits", "dataset_summary", "held_out_sets",
             "load_coco"),
    "decoder": ("decoder_copy",),
    "files": ("write_atomic",),
    "finetune": ("FineTuneConfig", "ObjectResult", "TrainingEmbeddings", "evaluate", "evaluate_objects", "fine_tune",
                 "make_loss", "train_and_register"),
    "images": ("MAX_PIXELS", "decode_image"),
    "inference_runtime": ("InferenceRuntime",),
    "losses": ("LOSSES", "SeedMSELoss", "WindowDiceLoss"),
    "jobs": ("Dispatcher", "Job", "JobStore", "TriggerPolicy", "project_lock", "run_job"),
    "models": ("VARIANTS", "LoadedModel", "ModelLoadError", "load_model"),
    "onnx_encoder": ("OnnxImageEncoder",),
    "quality": ("MaskQuality", "expected_iou", "measure_quality", "task_score"),
    "registry": ("PROJECT_NAME", "Registry", "RegistryError"),
    "runtime": ("BASE_VERSION", "Segmenter"),
    "score_metrics": ("score_report",),
    "types": ("Box", "Embedding", "Mask", "Point", "Prompts"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """`trainer.X` for a public name X: import its module now and keep the name here."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

