"""Embedding cache shared by serving and training: memory (MB-bounded LRU, single-flight) + optional disk."""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import Counter, OrderedDict
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
    """Embeddings as safetensors files under root/<encoder identity>/<hash>.safetensors (atomic writes).

    With ``max_mb``, the least recently used files (by mtime: a read touches its file) are deleted once the
    folder outgrows the bound, down to 90% of it. Several processes share the folder: each one rescans it
    after its own writes pass the bound or 5% of it, so the total stays near the bound.
    """

    RESCAN_FRACTION = 0.05
    EVICT_TO = 0.9

    def __init__(self, root: Path, max_mb: float | None = None) -> None:
        self.root = Path(root)
        self.max_bytes = None if max_mb is None else int(max_mb * 1024 * 1024)
        self._lock = threading.Lock()
        self._estimate: int | None = None  # bytes on disk at the last scan plus this process's writes since
        self._written = 0  # bytes this process wrote since the last scan

    def _path(self, key: str) -> Path:
        identity, digest = key.split("/")
        return self.root / identity / f"{digest}.safetensors"

    def contains(self, key: str) -> bool:
        return self._path(key).is_file()

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
            embedding = Embedding(features, _pair(meta["original_size"]), _pair(meta["resized_size"]),
                                  int(meta["input_size"]))
        except (SafetensorError, KeyError, ValueError, OSError):
            path.unlink(missing_ok=True)  # a damaged file is recomputed, never served
            return None
        self.touch(key)
        return embedding

    def touch(self, key: str) -> None:
        """Mark the key as just used (its file's mtime), so eviction keeps it longest."""
        try:
            os.utime(self._path(key))
        except OSError:
            pass

    def put(self, key: str, embedding: Embedding) -> None:
        from safetensors.torch import save_file

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"original_size": _text(embedding.original_size), "resized_size": _text(embedding.resized_size),
                "input_size": str(embedding.input_size)}
        write_atomic(path, lambda tmp: save_file({"features": embedding.features.contiguous().cpu()}, tmp,
                                                           metadata=meta),
                     fsync=False)  # a cache: a file lost in a crash is recomputed
        if self.max_bytes is not None:
            self._account(path.stat().st_size)

    def _account(self, size: int) -> None:
        with self._lock:
            self._written += size
            if self._estimate is not None:
                self._estimate += size
                if self._estimate <= self.max_bytes and self._written <= self.RESCAN_FRACTION * self.max_bytes:
                    return
        self.evict()

    def files(self) -> list[tuple[float, int, Path]]:
        """(mtime, bytes, path) of every stored embedding, least recently used first."""
        found = []
        for path in self.root.glob("*/*.safetensors"):
            if path.name.startswith(".tmp-"):
                continue  # another writer's file in progress
            try:
                stat = path.stat()
            except OSError:
                continue
            found.append((stat.st_mtime, stat.st_size, path))
        return sorted(found)

    def evict(self) -> int:
        """Delete least recently used files while the folder is over its bound (down to 90% of it);
        returns how many were deleted."""
        files = self.files()
        total = sum(size for _, size, _ in files)
        deleted = 0
        if self.max_bytes is not None and total > self.max_bytes:
            for _, size, path in files:
                if total <= self.EVICT_TO * self.max_bytes:
                    break
                path.unlink(missing_ok=True)
                total -= size
                deleted += 1
            log.info("disk embeddings evicted", extra={"files": deleted, "mb": round(total / 2**20, 1)})
        with self._lock:
            self._estimate, self._written = total, 0
        return deleted


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
        self._waiters: Counter[str] = Counter()  # callers waiting for another caller's computation, per key
        self._lock = threading.Lock()

    def get_or_compute(self, key: str, compute: Callable[[], Embedding],
                       keep_in_memory: bool = True) -> tuple[Embedding, bool]:
        """The cached embedding, from memory or disk (True), or a freshly computed one (False).
        keep_in_memory=False (pre-warming) stores a computed embedding on disk only, when there is a disk,
        leaving memory to live calls."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                if self.disk:
                    self.disk.touch(key)
                return self._items[key], True
            future = self._inflight.get(key)
            owner = future is None
            if owner:
                future = self._inflight[key] = Future()
            else:
                self._waiters[key] += 1
        if not owner:
            try:
                return future.result(), True
            finally:
                with self._lock:
                    self._waiters[key] -= 1
                    if not self._waiters[key]:
                        del self._waiters[key]
        try:
            embedding = self.disk.get(key) if self.disk else None
            computed = embedding is None
            if computed:
                embedding = compute()
                if self.disk:
                    try:
                        self.disk.put(key, embedding)
                    except OSError as exc:  # a full disk costs the copy for training, not the prediction
                        log.warning("embedding not written to disk", extra={"error": str(exc)})
            if keep_in_memory or not self.disk:
                self._store(key, embedding)
            future.set_result(embedding)
            return embedding, not computed
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def put(self, key: str, embedding: Embedding, keep_in_memory: bool = True) -> None:
        """Store an embedding computed elsewhere (a batch): on disk when there is one, in memory if asked
        (or when there is no disk)."""
        if self.disk:
            try:
                self.disk.put(key, embedding)
            except OSError as exc:
                log.warning("embedding not written to disk", extra={"error": str(exc)})
        if keep_in_memory or not self.disk:
            self._store(key, embedding)

    def waited_for(self, key: str | None) -> bool:
        """Whether some caller waits for this key's computation, which another caller runs."""
        with self._lock:
            return bool(key and self._waiters.get(key))

    def contains(self, key: str) -> bool:
        """Whether the key is served without computing (memory or disk)."""
        with self._lock:
            if key in self._items:
                return True
        return bool(self.disk and self.disk.contains(key))

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
