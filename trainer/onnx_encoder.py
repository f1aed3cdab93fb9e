"""The image encoder run by ONNX Runtime (INFERENCE_RUNTIME=onnxruntime, or auto on a CPU), called like the torch one.

At start, a background thread checks the cached export or has a child process make it (`trainer.onnx_export`)
while torch serves. Where ONNX Runtime cannot be imported, cannot load or export the model, or fails at run time,
the encoder falls back to torch with one warning log line (and stays on torch for the life of the process).
Fine-tuning and everything after the encoder (cache, decode, clicks) are unchanged: the features are the same
tensors to within float noise.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import subprocess
import threading
import time
import weakref
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .inference_runtime import InferenceRuntime
from .models import LoadedModel
from .onnx_export import (EXPORT_TIMEOUT_S, INPUT, OUTPUT, REPO_ROOT, ExportError, _encoder_device, _load_or_export,
                          export_command, export_key, export_path, open_export)

log = logging.getLogger(__name__)

Encoder = Callable[[torch.Tensor], torch.Tensor]


def _niceness() -> int:
    """The calling thread's nice value (Linux: per thread); 0 where it cannot be read."""
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except (AttributeError, OSError):
        return 0


def _stop_at_exit(encoder: "weakref.ref[OnnxImageEncoder]") -> None:
    alive = encoder()
    if alive is not None:
        alive.stop()


class OnnxImageEncoder:
    """The encoder as ONNX Runtime runs it, called like the torch one: (B, 3, S, S) float -> (B, C, G, G) float32
    (one run per image: the export has batch 1).

    The torch encoder serves until the export is ready: `start()` (or the first call) checks the cached export, or
    makes it, in a background thread — in a child process at low priority (`export_command`), in the thread itself
    for a hand-built model. Falls back to torch for good, with one warning log line, where ONNX Runtime cannot
    load, export or run it.

    One session per scheduling priority of the threads that call it: ONNX Runtime's worker threads take the nice
    value of the thread that creates the session, so pre-warm's encodes (nice 15) stay behind live calls' (nice 5),
    as with torch, whose workers take their caller's. The background thread makes the first session for its own
    priority (start it from a thread of the priority that serves); another priority's is made on its first call.
    """

    def __init__(self, model: LoadedModel, export_dir: Path, threads: int | None = None,
                 export_timeout_s: float = EXPORT_TIMEOUT_S) -> None:
        self.model = model
        self.export_dir = Path(export_dir)
        self.threads = threads or torch.get_num_threads()
        self.export_timeout_s = export_timeout_s
        self.export_seconds: float | None = None  # None: the cached export was used
        self.export_reason: str | None = None  # why it was exported: none cached, stale, corrupt
        self._sessions: dict[int, object] = {}
        self._fallback: str | None = None
        self._lock = threading.Lock()
        self._ready = threading.Event()  # set once a session exists or the encoder fell back
        self._thread: threading.Thread | None = None
        self._child: subprocess.Popen | None = None
        self._stopping = False

    @property
    def runtime(self) -> InferenceRuntime:
        """What runs the encoder now: onnxruntime once its session is ready, torch before and after a fallback."""
        return InferenceRuntime.ONNXRUNTIME if self._sessions and not self._fallback else InferenceRuntime.TORCH

    def start(self) -> None:
        """Begin checking or making the export in the background (once; the first call does it otherwise). The
        process's exit stops it (`stop`): a thread still inside ONNX Runtime or torch when the interpreter
        finalizes aborts the process."""
        with self._lock:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._prepare, name="onnx-export", daemon=True)
                self._thread.start()
                atexit.register(_stop_at_exit, weakref.ref(self))

    def ready(self, timeout_s: float | None = None) -> bool:
        """Wait until ONNX Runtime serves (True) or the encoder has fallen back to torch (False)."""
        self.start()
        self._ready.wait(timeout_s)
        return self._session() is not None

    def stop(self, timeout_s: float = 10.0) -> bool:
        """At the process's exit: end an export child (it removes its temporary file) and the background thread.
        Returns whether the thread has ended."""
        with self._lock:
            self._stopping = True
            child, thread = self._child, self._thread
        if child is not None and child.poll() is None:
            child.terminate()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        return thread is None or not thread.is_alive()

    def _fall_back(self, reason: str) -> None:
        if self._fallback is None:
            self._fallback = reason
            log.warning("onnxruntime unavailable for the image encoder: falling back to torch",
                        extra={"runtime": "onnxruntime", "fallback": "torch", "model": self.model.identity,
                               "reason": reason[:500]})
        self._ready.set()

    def _prepare(self) -> None:
        """The background thread: the cached export, checked, or a new one; then this priority's session."""
        try:
            key, path = export_key(self.model), export_path(self.model, self.export_dir)
            try:
                session = open_export(path, key, self.model.input_size, self.threads)
            except (FileNotFoundError, ExportError):
                command = export_command(self.model, self.export_dir, self.threads)
                if command is None:
                    session, self.export_seconds, self.export_reason = _load_or_export(
                        self.model, self.export_dir, self.threads)
                else:
                    self.export_seconds = self._export_in_child(command)
                    session = open_export(path, key, self.model.input_size, self.threads)
            with self._lock:
                self._sessions[_niceness()] = session
            log.info("image encoder on onnxruntime", extra={
                "model": self.model.identity, "path": str(path), "exported": self.export_reason,
                "export_s": None if self.export_seconds is None else round(self.export_seconds, 1)})
            self._ready.set()
        except Exception as exc:  # ImportError, export or load failures: torch serves instead
            if self._stopping:  # the process exits: nothing to say
                self._fallback = "stopped"
                self._ready.set()
            else:
                self._fall_back(f"{type(exc).__name__}: {exc}")

    def _export_in_child(self, command: list[str]) -> float:
        """Run the export child; its seconds. Raises ExportError when it fails, is stopped or takes too long."""
        started = time.perf_counter()
        with self._lock:
            if self._stopping:
                raise ExportError("the process is stopping")
            self._child = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True)
        try:
            stdout, stderr = self._child.communicate(timeout=self.export_timeout_s)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.communicate()
            raise ExportError(f"the export took more than {self.export_timeout_s:.0f} s") from None
        if self._child.returncode != 0:
            raise ExportError(f"the export process exited with {self._child.returncode}: {stderr.strip()[-400:]}")
        self.export_reason = json.loads(stdout.strip().splitlines()[-1]).get("reason")
        return time.perf_counter() - started

    def _session(self):
        """The session for the calling thread's priority (made on its first call); None while the export is not
        ready and after a fallback."""
        if self._fallback:
            return None
        if not self._ready.is_set():
            self.start()
            return None
        nice = _niceness()
        session = self._sessions.get(nice)
        if session is None:
            with self._lock:
                session = self._sessions.get(nice)
                if session is None and not self._fallback:
                    try:
                        session = open_export(export_path(self.model, self.export_dir), export_key(self.model),
                                              self.model.input_size, self.threads)
                        self._sessions[nice] = session
                    except Exception as exc:
                        self._fall_back(f"{type(exc).__name__}: {exc}")
        return session

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        session = self._session()
        if session is not None:
            try:
                batch = x.detach().float().cpu().numpy()
                out = [session.run([OUTPUT], {INPUT: batch[i:i + 1]})[0] for i in range(batch.shape[0])]
                return torch.from_numpy(np.concatenate(out)).to(x.device)
            except Exception as exc:
                self._fall_back(f"run failed: {type(exc).__name__}: {exc}")
                with self._lock:
                    self._sessions.clear()
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
