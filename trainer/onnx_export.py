"""The image encoder exported to ONNX: made once per weights and runtime versions, cached, checked, rebuilt.

The served model's encoder (`model.sam.image_encoder`: (1, 3, S, S) float -> features (1, C, G, G), LiteMedSAM:
S 256, C 256, G 64) is exported locally from its weights with `torch.onnx.export` (no network) into
EXPORT_DIR/image_encoder-<key>.onnx (default MODEL_DIR/exports), key = the weights' identity
(`LoadedModel.identity`) + the onnxruntime, torch and opset versions. A server exports in a child process
(`python -m trainer.onnx_export`, `export_command`: its ~1 GB of tracing and its CPU time stay out of the server, at
low priority). The file is written atomically (temporary file + rename) under a flock, so two workers starting
together export once. It carries its key and a fingerprint of the torch encoder's output on a fixed probe input in
its metadata; a file whose key differs (stale) or that cannot be loaded or whose probe output differs (corrupt) is
rebuilt, never served. The probe run on load doubles as the session's warm-up.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .files import exclusive_lock, write_atomic
from .models import LoadedModel

log = logging.getLogger(__name__)

OPSET = 17
INPUT, OUTPUT = "image", "features"
KEY_PROP, PROBE_PROP = "sam_backend.export_key", "sam_backend.probe"
PROBE_VALUES = 512  # features sampled for the fingerprint
PROBE_TOLERANCE = 1e-3  # max |ort - torch| on the probe, relative to the features' scale (float noise: ~1e-6)
EXPORT_TIMEOUT_S = 600.0  # LiteMedSAM: ~7-10 s on 2 cores; a vit_h export takes minutes
EXPORT_NICENESS = 15  # the export child's priority: the serving process's live calls come first
UNUSED_EXPORT_S = 7 * 86400.0  # another version's export of the same weights, unused this long, is removed
REPO_ROOT = Path(__file__).resolve().parents[1]  # where `python -m trainer.onnx_export` finds the package


class ExportError(RuntimeError):
    """An export that cannot be made, loaded or trusted (stale key, corrupt file, probe mismatch)."""


def _ort():
    import onnxruntime

    return onnxruntime


def export_key(model: LoadedModel) -> str:
    """What an export depends on: the weights, onnxruntime's, torch's and the opset's versions."""
    return f"{model.identity}-ort{_ort().__version__}-torch{torch.__version__}-opset{OPSET}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def export_path(model: LoadedModel, export_dir: Path) -> Path:
    """export_dir/image_encoder-<key>.onnx (the key with anything but [A-Za-z0-9._-] as _)."""
    return Path(export_dir) / f"image_encoder-{_safe(export_key(model))}.onnx"


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
    (idle spinning threads would take the cores from the torch decoder and the other workers), no memory pattern
    (LiteMedSAM, 2 cores: resident memory 0.43 GB instead of 0.71 GB a session, at the same speed; a worker holds
    one session per priority that encodes)."""
    ort = _ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.enable_mem_pattern = False
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
    with contextlib.suppress(OSError):
        os.utime(path)  # used: `_remove_leftovers` keeps it
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
    session, seconds, _ = _load_or_export(model, export_dir, threads or torch.get_num_threads())
    return session, seconds


def _load_or_export(model: LoadedModel, export_dir: Path, threads: int) -> tuple[object, float | None, str | None]:
    """load_or_export, and why it exported (None: it did not)."""
    key = export_key(model)
    path = export_path(model, export_dir)
    with contextlib.suppress(FileNotFoundError, ExportError):
        return open_export(path, key, model.input_size, threads), None, None
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(path.with_name(path.name + ".lock")):
        try:  # another worker may have exported it while this one waited for the lock
            return open_export(path, key, model.input_size, threads), None, None
        except FileNotFoundError:
            reason = "none cached"
        except ExportError as exc:
            reason = str(exc)
        _remove_leftovers(path, model)
        started = time.perf_counter()

        def check(tmp: Path) -> None:
            _write_export(model, key, tmp)
            open_export(tmp, key, model.input_size, threads)  # a bad export never replaces anything

        write_atomic(path, check)
        seconds = time.perf_counter() - started
        log.info("image encoder exported to ONNX", extra={"model": model.identity, "path": str(path),
                                                           "seconds": round(seconds, 1), "reason": reason})
    return open_export(path, key, model.input_size, threads), seconds, reason


def _remove_leftovers(path: Path, model: LoadedModel) -> None:
    """Before making `path`: temporary files of exports killed mid-way (SIGKILL: no clean-up ran) older than any
    export takes, and the same weights' exports for other versions (onnxruntime, torch, opset upgraded) that no
    process has loaded for UNUSED_EXPORT_S (`open_export` marks a file used; another install may share the
    folder)."""
    now = time.time()
    same_weights = f"image_encoder-{_safe(model.identity)}-*.onnx"
    for old, unused_s in [*((tmp, EXPORT_TIMEOUT_S) for tmp in path.parent.glob(".tmp-*.onnx")),
                          *((other, UNUSED_EXPORT_S) for other in path.parent.glob(same_weights) if other != path)]:
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > unused_s:
                old.unlink()
                old.with_name(old.name + ".lock").unlink(missing_ok=True)


def export_command(model: LoadedModel, export_dir: Path, threads: int) -> list[str] | None:
    """The child process that exports a model loaded from a checkpoint (None for a hand-built one): the export's
    memory (~1 GB of tracing for LiteMedSAM) and its time stay out of the serving process."""
    if model.checkpoint is None:
        return None
    return [sys.executable, "-m", "trainer.onnx_export", "--variant", model.variant, "--checkpoint", str(model.checkpoint),
            "--sha256", model.weights_sha256, "--export-dir", str(export_dir), "--threads", str(threads)]


def main(argv: list[str] | None = None) -> int:
    """The export child (`export_command`): load the checkpoint on the CPU, check or make its export, print
    {"seconds", "reason"} as one JSON line. SIGTERM ends it cleanly (its temporary file removed)."""
    import argparse

    from .models import load_model

    parser = argparse.ArgumentParser(prog="python -m trainer.onnx_export", description=main.__doc__)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--sha256", required=True)
    parser.add_argument("--export-dir", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with contextlib.suppress(OSError):
        os.nice(EXPORT_NICENESS)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.variant, args.checkpoint, args.sha256, "cpu")
    _, seconds, reason = _load_or_export(model, args.export_dir, torch.get_num_threads())
    print(json.dumps({"seconds": seconds, "reason": reason}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
