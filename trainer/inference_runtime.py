"""Which runtime runs the image encoder (INFERENCE_RUNTIME): torch, ONNX Runtime, or auto.

Light on purpose (no torch, no onnxruntime at import time): the settings table declares its value with it.
"""
from __future__ import annotations

import importlib.util
from enum import Enum


class InferenceRuntime(str, Enum):
    """torch: PyTorch eager (fp32, or bf16 autocast with ENCODER_BF16). onnxruntime: the encoder exported to ONNX
    on first use and run by ONNX Runtime on the CPU (fp32). auto: onnxruntime where it is installed and the model
    runs on the CPU, else torch."""

    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    AUTO = "auto"

    def __str__(self) -> str:  # the settings docs and logs show the value, not `InferenceRuntime.TORCH`
        return self.value

    @classmethod
    def _missing_(cls, value: object) -> "InferenceRuntime":
        """Case-insensitive; an unknown name is a ValueError that lists the choices."""
        if isinstance(value, str):
            for member in cls:
                if member.value == value.strip().lower():
                    return member
        raise ValueError(f"unknown inference runtime {value!r}: use one of {' | '.join(m.value for m in cls)}")

    def resolve(self, device: str = "cpu") -> "InferenceRuntime":
        """The runtime actually asked for: auto -> onnxruntime on a CPU model when the package is installed,
        else torch. (onnxruntime named explicitly stays onnxruntime; the encoder falls back itself, with a log
        line, where it cannot run.)"""
        if self is not InferenceRuntime.AUTO:
            return self
        if str(device).startswith("cpu") and importlib.util.find_spec("onnxruntime") is not None:
            return InferenceRuntime.ONNXRUNTIME
        return InferenceRuntime.TORCH
