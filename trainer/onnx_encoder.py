"""The image encoder exported to ONNX and run by ONNX Runtime (INFERENCE_RUNTIME=onnxruntime).

On first use the served model's encoder (`model.sam.image_encoder`: (1, 3, S, S) float -> features (1, C, G, G),
LiteMedSAM: S 256, C 256, G 64) is exported locally from the loaded weights with `torch.onnx.export` (no network)
into MODEL_DIR/exports/image_encoder-<key>.onnx, key = the weights' identity (`LoadedModel.identity`) + the
onnxruntime, torch and opset versions. The file is written atomically (temporary file + rename) under a flock, so
two workers starting together export once. It carries its key and a fingerprint of the torch encoder's output on
a fixed probe input in its metadata; a file whose key differs (stale) or that cannot be loaded or whose probe output
differs (corrupt) is rebuilt, never served. The probe run on load doubles as the session's warm-up.

Where ONNX Runtime cannot be imported, cannot load or export the model, or fails at run time, the encoder falls
back to torch with one warning log line (and stays on torch for the life of the process). Fine-tuning and
everything after the encoder (cache, decode, clicks) are unchanged: the features are the same tensors to within
float noise.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .files import exclusive_lock, write_atomic
from .inference_runtime import InferenceRuntime
from .models import LoadedModel

log = logging.getLogger(__name__)

EXPORT_DIR = "exports"  # under MODEL_DIR
OPSET = 17
INPUT, OUTPUT = "image", "features"
KEY_PROP, PROBE_PROP = "sam_backend.export_key", "sam_backend.probe"
PROBE_VALUES = 512  # features sampled for the fingerprint
PROBE_TOLERANCE = 1e-3  # max |ort - torch| on the probe, relative to the features' scale (float noise: ~1e-6)

Encoder = Callable[[torch.Tensor], torch.Tensor]


class ExportError(RuntimeError):
    """An export that cannot be made, loaded or trusted (stale key, corrupt file, probe mismatch)."""


def _ort():
    import onnxruntime

    return onnxruntime


def export_key(model: LoadedModel) -> str:
    """What an export depends on: the weights, onnxruntime's, torch's and the opset's versions."""
    return f"{model.identity}-ort{_ort().__version__}-torch{torch.__version__}-opset{OPSET}"


def export_path(model: LoadedModel, export_dir: Path) -> Path:
    """export_dir/image_encoder-<key>.onnx (the key with anything but [A-Za-z0-9._-] as _)."""
    return Path(export_dir) / f"image_encoder-{re.sub(r'[^A-Za-z0-9._-]', '_', export_key(model))}.onnx"


def _encoder_device(model: LoadedModel) -> torch.device:
    return next(model.sam.image_encoder.parameters()).device


def probe_input(input_size: int) -> torch.Tensor:
    """A fixed (1, 3, S, S) float input in [0, 1) (seeded): the same on every host and run."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand((1, 3, input_size, input_size), generator=generator)


def fingerprint(features: np.ndarray) -> list[float]:
    """PROBE_VALUES features (any shape) at fixed, evenly spaced positions of the flattened array."""
    flat = np.asarray(features, dtype=np.float32).reshape(-1)
    return flat[np.linspace(0, flat.size - 1, PROBE_VALUES).astype(np.int64)].tolist()


def _session(path: Path, threads: int):
    """An ONNX Runtime CPU session on `path`: `threads` intra-op threads, one inter-op, no spinning between runs
    (idle spinning threads would take the cores from the torch decoder and the other workers)."""
    ort = _ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def open_export(path: Path, key: str, input_size: int, threads: int):
    """A session on the export at `path`, checked: its key is `key` and its probe output matches the fingerprint
    the export recorded. Raises ExportError (stale, corrupt or unreadable), FileNotFoundError (none yet)."""
    if not Path(path).is_file():
        raise FileNotFoundError(path)
    try:
        session = _session(path, threads)
        meta = session.get_modelmeta().custom_metadata_map
        expected = np.asarray(json.loads(meta.get(PROBE_PROP, "null")) or [], dtype=np.float32)
    except Exception as exc:  # onnxruntime's own exception classes; a file that does not parse
        raise ExportError(f"cannot load {Path(path).name}: {str(exc)[:300]}") from exc
    if meta.get(KEY_PROP) != key:
        raise ExportError(f"{Path(path).name} is stale: made for {meta.get(KEY_PROP)!r}, not {key!r}")
    if expected.size != PROBE_VALUES:
        raise ExportError(f"{Path(path).name} has no probe fingerprint")
    try:
        got = np.asarray(fingerprint(session.run([OUTPUT], {INPUT: probe_input(input_size).numpy()})[0]))
    except Exception as exc:
        raise ExportError(f"{Path(path).name} fails on the probe input: {str(exc)[:300]}") from exc
    error = float(np.abs(got - expected).max())
    if not error <= PROBE_TOLERANCE * max(1.0, float(np.abs(expected).max())):  # also catches NaN
        raise ExportError(f"{Path(path).name} is corrupt: probe output differs from torch's by {error:.3g}")
    return session


def _write_export(model: LoadedModel, key: str, tmp: Path) -> None:
    """torch.onnx.export of the encoder (batch 1: the TinyViT graph fixes its batch size) into `tmp`, then its key
    and the torch encoder's probe fingerprint into the file's metadata."""
    import onnx

    encoder = model.sam.image_encoder
    probe = probe_input(model.input_size).to(_encoder_device(model))
    # Segmenter.embed runs under inference_mode, which the exporter's tracing cannot work in.
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and constant-folding notes: not for the server's log
        reference = encoder(probe).float().cpu().numpy()
        torch.onnx.export(encoder, (probe,), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=[OUTPUT], do_constant_folding=True)
    graph = onnx.load(str(tmp))
    for name, value in ((KEY_PROP, key), (PROBE_PROP, json.dumps(fingerprint(reference)))):
        graph.metadata_props.add(key=name, value=value)
    onnx.save(graph, str(tmp))


def load_or_export(model: LoadedModel, export_dir: Path, threads: int | None = None) -> tuple[object, float | None]:
    """An ONNX Runtime session on the model's checked export, exporting it first when there is none or it is stale
    or corrupt: (session, export seconds, None when the cached file was used). Raises on any failure."""
    key = export_key(model)
    path = export_path(model, export_dir)
    threads = threads or torch.get_num_threads()
    with contextlib.suppress(FileNotFoundError, ExportError):
        return open_export(path, key, model.input_size, threads), None
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(path.with_name(path.name + ".lock")):
        try:  # another worker may have exported it while this one waited for the lock
            return open_export(path, key, model.input_size, threads), None
        except FileNotFoundError:
            reason = "none cached"
        except ExportError as exc:
            reason = str(exc)
        started = time.perf_counter()

        def check(tmp: Path) -> None:
            _write_export(model, key, tmp)
            open_export(tmp, key, model.input_size, threads)  # a bad export never replaces anything

        write_atomic(path, check)
        seconds = time.perf_counter() - started
        log.info("image encoder exported to ONNX", extra={"model": model.identity, "path": str(path),
                                                           "seconds": round(seconds, 1), "reason": reason})
    return open_export(path, key, model.input_size, threads), seconds


class OnnxImageEncoder:
    """The encoder as ONNX Runtime runs it, called like the torch one: (B, 3, S, S) float -> (B, C, G, G) float32
    (one run per image: the export has batch 1). Loads or exports on first call (thread-safe); falls back to the
    torch encoder, with one warning log line, where ONNX Runtime cannot load, export or run it."""

    def __init__(self, model: LoadedModel, export_dir: Path, threads: int | None = None) -> None:
        self.model = model
        self.export_dir = Path(export_dir)
        self.threads = threads
        self.export_seconds: float | None = None
        self._session = None
        self._fallback: str | None = None
        self._lock = threading.Lock()

    @property
    def runtime(self) -> InferenceRuntime:
        """What runs the encoder now: onnxruntime, or torch after a fallback."""
        return InferenceRuntime.TORCH if self._fallback else InferenceRuntime.ONNXRUNTIME

    def ready(self) -> bool:
        """Load (or export) now; False when the encoder fell back to torch."""
        return self._get() is not None

    def _fall_back(self, reason: str) -> None:
        if self._fallback is None:
            self._fallback = reason
            log.warning("onnxruntime unavailable for the image encoder: falling back to torch",
                        extra={"runtime": "onnxruntime", "fallback": "torch", "model": self.model.identity,
                               "reason": reason[:500]})

    def _get(self):
        if self._session is not None or self._fallback:
            return self._session
        with self._lock:
            if self._session is None and not self._fallback:
                try:
                    self._session, self.export_seconds = load_or_export(self.model, self.export_dir, self.threads)
                except Exception as exc:  # ImportError, export or load failures: torch serves instead
                    self._fall_back(f"{type(exc).__name__}: {exc}")
        return self._session

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        session = self._get()
        if session is not None:
            try:
                batch = x.detach().float().cpu().numpy()
                out = [session.run([OUTPUT], {INPUT: batch[i:i + 1]})[0] for i in range(batch.shape[0])]
                return torch.from_numpy(np.concatenate(out)).to(x.device)
            except Exception as exc:
                self._fall_back(f"run failed: {type(exc).__name__}: {exc}")
                self._session = None
        return self.model.sam.image_encoder(x)


def image_encoder(model: LoadedModel, runtime: InferenceRuntime | str = InferenceRuntime.TORCH,
                  export_dir: Path | None = None) -> Encoder:
    """The encoder the runtime names (auto resolved for the model's device): the torch module itself, or an
    OnnxImageEncoder exporting under export_dir (MODEL_DIR/exports). ONNX Runtime runs on the CPU only here: a
    CUDA model keeps torch (one log line)."""
    runtime = InferenceRuntime(runtime).resolve(str(_encoder_device(model)))
    if runtime is InferenceRuntime.TORCH:
        return model.sam.image_encoder
    if export_dir is None:
        raise ValueError("the onnxruntime encoder needs a folder for its export (MODEL_DIR/exports)")
    encoder = OnnxImageEncoder(model, export_dir)
    if _encoder_device(model).type != "cpu":
        encoder._fall_back(f"the model runs on {_encoder_device(model)}; onnxruntime serves CPU models only")
    return encoder
