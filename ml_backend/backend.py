"""The request path: Label Studio tasks -> images -> embeddings -> masks -> Label Studio predictions."""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from trainer.active import ActiveDecoders
from trainer.cache import DiskEmbeddings, EmbeddingCache, image_key
from trainer.models import load_model
from trainer.runtime import Segmenter
from trainer.types import Prompts

from . import protocol
from .fetch import ImageError, ImageFetcher, ImageSource, image_source
from .label_studio import save_connection
from .netpolicy import parse_allowed_hosts
from .settings import Settings

log = logging.getLogger("ml_backend")


def build_segmenter(settings: Settings, serving: bool = True) -> Segmenter:
    """The model the settings name (SAM_MODEL, SAM_CHECKPOINT[_SHA256], DEVICE, TORCH_THREADS): the one way the
    server, the training jobs and the command line load it. bf16 autocast (ENCODER_/DECODER_BF16) is for serving
    only: training and evaluation run in fp32."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    model = load_model(settings.sam_model, settings.sam_checkpoint, settings.sam_checkpoint_sha256, settings.device)
    if not serving:
        return Segmenter(model)
    return Segmenter(model, settings.encoder_bf16, settings.decoder_bf16)


class SamBackend:
    """One per process: the model (loaded once, at start), the embedding cache and the served versions."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        try:
            self._allowed_hosts = parse_allowed_hosts(settings.allowed_image_hosts)
        except ValueError as exc:
            raise SystemExit(f"ALLOWED_IMAGE_HOSTS: {exc}") from None
        self.segmenter = build_segmenter(settings)
        disk = DiskEmbeddings(settings.model_dir / "embeddings") if settings.disk_cache else None
        self.cache = EmbeddingCache(settings.cache_mb, disk)
        self.decoders = ActiveDecoders(settings.model_dir, self.segmenter)
        self._loaders: dict[ImageSource, ImageFetcher] = {}
        self._loaders_lock = threading.Lock()
        self._fetch_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="image-fetch")

    # -- versions -----------------------------------------------------------------------------------
    def model_version(self, project: str | None) -> str:
        return self.segmenter.model_version(self.decoders.get(project).version)

    def setup(self, project: str | None, hostname: str | None, access_token: str | None) -> str:
        """Remember how to reach this project's Label Studio (for image URLs); answer the served version."""
        if project and (hostname or access_token):
            save_connection(self.settings, project, hostname, access_token)
        return self.model_version(project)

    # -- predictions --------------------------------------------------------------------------------
    def predict(self, query: protocol.PredictRequest) -> list[dict]:
        """One prediction entry per task, in task order. A task whose image fails gets an error entry."""
        tasks, config, project, context = query.tasks, query.config, query.project, query.context
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
            if query.interactive:
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
    def _task_image(loader: ImageFetcher, task: dict, config: protocol.LabelConfig):
        return loader.load(protocol.task_image_url(task, config), task.get("id"))

    # -- Label Studio connection ----------------------------------------------------------------------
    def _loader(self, project: str | None) -> ImageFetcher:
        source = image_source(self.settings, project, self._allowed_hosts)
        with self._loaders_lock:
            if source not in self._loaders:
                self._loaders[source] = ImageFetcher(source)
            return self._loaders[source]
