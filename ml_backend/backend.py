"""The request path: Label Studio tasks -> images -> embeddings -> masks -> Label Studio predictions."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from trainer.active import ActiveDecoders
from trainer.cache import DiskEmbeddings, EmbeddingCache, image_key
from trainer.images import ImageError, ImageLoader, ImageSource, parse_allowed_hosts
from trainer.models import load_model
from trainer.registry import PROJECT_NAME
from trainer.runtime import Segmenter
from trainer.types import Prompts

from . import protocol
from .settings import Settings

log = logging.getLogger("ml_backend")


class SamBackend:
    """One per process: the model (loaded once, at start), the embedding cache and the served versions."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        try:
            self._allowed_hosts = parse_allowed_hosts(settings.allowed_image_hosts)
        except ValueError as exc:
            raise SystemExit(f"ALLOWED_IMAGE_HOSTS: {exc}") from None
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        model = load_model(settings.sam_model, settings.sam_checkpoint, settings.sam_checkpoint_sha256,
                           settings.device)
        self.segmenter = Segmenter(model, settings.encoder_bf16, settings.decoder_bf16)
        disk = DiskEmbeddings(settings.model_dir / "embeddings") if settings.disk_cache else None
        self.cache = EmbeddingCache(settings.cache_mb, disk)
        self.decoders = ActiveDecoders(settings.model_dir, self.segmenter)
        self._loaders: dict[ImageSource, ImageLoader] = {}
        self._loaders_lock = threading.Lock()
        self._fetch_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="image-fetch")

    # -- versions -----------------------------------------------------------------------------------
    def model_version(self, project: str | None) -> str:
        return self.segmenter.model_version(self.decoders.get(project).version)

    def setup(self, project: str | None, hostname: str | None, access_token: str | None) -> str:
        """Remember how to reach this project's Label Studio (for image URLs); answer the served version."""
        if project and (hostname or access_token):
            self._save_connection(project, hostname, access_token)
        return self.model_version(project)

    # -- predictions --------------------------------------------------------------------------------
    def predict(self, tasks: list[dict], config: protocol.LabelConfig, project: str | None,
                context: dict | None) -> list[dict]:
        """One prediction entry per task, in task order. A task whose image fails gets an error entry."""
        served = self.decoders.get(project)
        version = self.segmenter.model_version(served.version)
        loader = self._loader(project)
        images = [self._fetch_pool.submit(self._task_image, loader, task, config) for task in tasks]
        results = []
        for task, image_future in zip(tasks, images):
            started = time.perf_counter()
            try:
                image = image_future.result()
            except (ImageError, protocol.ProtocolError) as exc:
                log.warning("task image failed", extra={"task": task.get("id"), "error": str(exc)})
                results.append({"model_version": version, "error": str(exc)})  # no "result": LS stores nothing
                continue
            height, width = image.shape[:2]
            if context and context.get("result"):
                prompts = protocol.context_prompts(context, config, width, height)
            else:
                prompts = Prompts(boxes=tuple(protocol.task_boxes(task, config, width, height)))
            if len(prompts.boxes) > self.settings.max_boxes:
                raise protocol.ProtocolError(f"task {task.get('id')} has {len(prompts.boxes)} boxes; "
                                             f"at most {self.settings.max_boxes} (MAX_BOXES_PER_TASK)")
            cached = False
            masks = []
            if prompts.boxes or prompts.points:
                embedding, cached = self.cache.get_or_compute(
                    image_key(self.segmenter.encoder_identity, image), lambda: self.segmenter.embed(image))
                masks = self.segmenter.decode(embedding, prompts, served.module)
            results.append(protocol.prediction(masks, config, version))
            log.info("task predicted", extra={"task": task.get("id"), "boxes": len(prompts.boxes),
                                              "points": len(prompts.points), "embedding_cached": cached,
                                              "ms": round(1000 * (time.perf_counter() - started), 1)})
        return results

    @staticmethod
    def _task_image(loader: ImageLoader, task: dict, config: protocol.LabelConfig):
        return loader.load(protocol.task_image_url(task, config), task.get("id"))

    # -- Label Studio connection ----------------------------------------------------------------------
    def _save_connection(self, project: str, hostname: str | None, access_token: str | None) -> None:
        path = connection_path(self.settings, project)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"hostname": hostname, "access_token": access_token}, handle)
        os.replace(tmp, path)

    def _loader(self, project: str | None) -> ImageLoader:
        source = image_source(self.settings, project, self._allowed_hosts)
        with self._loaders_lock:
            if source not in self._loaders:
                self._loaders[source] = ImageLoader(source)
            return self._loaders[source]


def connection_path(settings: Settings, project: str) -> Path | None:
    """Where /setup's Label Studio hostname and token for a project are kept (0600)."""
    if not PROJECT_NAME.match(project):
        return None
    return settings.model_dir / "projects" / project / "connection.json"


def saved_connection(settings: Settings, project: str | None) -> dict:
    path = connection_path(settings, project) if project else None
    try:
        return json.loads(path.read_text()) if path else {}
    except (OSError, json.JSONDecodeError):
        return {}


def image_source(settings: Settings, project: str | None,
                 allowed_hosts: tuple[str, ...] | None = None) -> ImageSource:
    """Where a project's task images come from: LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY, else what /setup
    told us, under the image settings (allowed hosts, limits)."""
    s = settings
    connection = saved_connection(s, project) if not (s.label_studio_url and s.label_studio_api_key) else {}
    return ImageSource(
        label_studio_url=s.label_studio_url or connection.get("hostname"),
        token=s.label_studio_api_key or connection.get("access_token"),
        allowed_hosts=parse_allowed_hosts(s.allowed_image_hosts) if allowed_hosts is None else allowed_hosts,
        timeout_s=s.image_timeout_s, max_pixels=s.max_image_pixels, max_bytes=s.max_image_bytes,
        allow_private=s.allow_private_image_hosts,
    )
