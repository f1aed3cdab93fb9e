"""Embedding cache shared by serving and training: memory (MB-bounded LRU, single-flight) + optional disk."""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import numpy as np

from .files import write_atomic
from .types import Embedding

log = logging.getLogger(__name__)


def image_key(encoder_identity: str, image: np.ndarray) -> str:
    """Cache key: the encoder's identity plus a hash of the decoded pixels and their shape."""
    digest = hashlib.sha256(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).data)
    return f"{encoder_identity}/{digest.hexdigest()[:32]}"


class DiskEmbeddings:
    """Embeddings as safetensors files under root/<encoder identity>/<hash>.safetensors (atomic writes)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        identity, digest = key.split("/")
        return self.root / identity / f"{digest}.safetensors"

    def get(self, key: str) -> Embedding | None:
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata()
                features = handle.get_tensor("features")
            return Embedding(features, _pair(meta["original_size"]), _pair(meta["resized_size"]),
                             int(meta["input_size"]))
        except (SafetensorError, KeyError, ValueError, OSError):
            path.unlink(missing_ok=True)  # a damaged file is recomputed, never served
            return None

    def put(self, key: str, embedding: Embedding) -> None:
        from safetensors.torch import save_file

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"original_size": _text(embedding.original_size), "resized_size": _text(embedding.resized_size),
                "input_size": str(embedding.input_size)}
        write_atomic(path, lambda tmp: save_file({"features": embedding.features.contiguous()}, tmp, metadata=meta),
                     fsync=False)  # a cache: a file lost in a crash is recomputed


def _text(pair: tuple[int, int]) -> str:
    return f"{pair[0]},{pair[1]}"


def _pair(text: str) -> tuple[int, int]:
    a, b = text.split(",")
    return int(a), int(b)


class EmbeddingCache:
    """Thread-safe LRU bounded in MB; concurrent requests for one new key compute it once."""

    def __init__(self, max_mb: float, disk: DiskEmbeddings | None = None) -> None:
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.disk = disk
        self._items: OrderedDict[str, Embedding] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[str, Future] = {}
        self._lock = threading.Lock()

    def get_or_compute(self, key: str, compute: Callable[[], Embedding]) -> tuple[Embedding, bool]:
        """The cached embedding (True) or a freshly computed one (False)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key], True
            future = self._inflight.get(key)
            owner = future is None
            if owner:
                future = self._inflight[key] = Future()
        if not owner:
            return future.result(), True
        try:
            embedding = self.disk.get(key) if self.disk else None
            if embedding is None:
                embedding = compute()
                if self.disk:
                    try:
                        self.disk.put(key, embedding)
                    except OSError as exc:  # a full disk costs the copy for training, not the prediction
                        log.warning("embedding not written to disk", extra={"error": str(exc)})
            self._store(key, embedding)
            future.set_result(embedding)
            return embedding, False
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _store(self, key: str, embedding: Embedding) -> None:
        with self._lock:
            if embedding.nbytes > self.max_bytes:
                return
            self._items[key] = embedding
            self._bytes += embedding.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
