"""The request path, on typed objects only (ml_backend/protocol.py parses the body and formats the answer):
PredictTask -> image (the project's Label Studio client) -> embedding (cache) -> masks -> TaskAnswer."""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import numpy as np
import torch

from trainer.active import ActiveDecoders
from trainer.cache import DiskEmbeddings, EmbeddingCache, image_key
from trainer.clicks import ClickMemory
from trainer.models import load_model
from trainer.runtime import Segmenter
from trainer.types import Prompts

from . import protocol
from .compute import ComputePool, Deferred
from .credentials import connection_path, save_connection
from .fetch import ImageError, ImageFetcher, image_source
from .label_studio import ConnectError, ProjectClient
from .protocol import ImageRef, PredictRequest, PredictTask, ProtocolError, TaskAnswer
from .netpolicy import parse_allowed_hosts
from .host_calls import HostLiveCalls
from .prewarm import ImageJob, Prewarmer
from .settings import Settings

log = logging.getLogger("ml_backend")


def build_segmenter(settings: Settings, serving: bool = True) -> Segmenter:
    """The model the settings name (SAM_MODEL, SAM_CHECKPOINT[_SHA256], DEVICE, TORCH_THREADS): the one way the
    server, the training jobs and the command line load it. The encoder's runtime (INFERENCE_RUNTIME, its export
    under EXPORT_DIR) and bf16 autocast (ENCODER_/DECODER_BF16) are for serving only: training and evaluation run
    torch in fp32."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    model = load_model(settings.sam_model, settings.sam_checkpoint, settings.sam_checkpoint_sha256, settings.device)
    if not serving:
        return Segmenter(model)
    return Segmenter(model, settings.encoder_bf16, settings.decoder_bf16, runtime=settings.inference_runtime,
                     export_dir=settings.exports)


@dataclass(frozen=True)
class Predictions:
    """A /predict answer: one TaskAnswer per task, in task order, of `model_version`; how many were deferred."""

    answers: tuple[TaskAnswer, ...]
    model_version: str
    deferred: int = 0

    def _count(self, state: str) -> int:
        return sum(1 for answer in self.answers if answer.state == state)

    @property
    def failed(self) -> int:
        return self._count(protocol.FAILED)

    @property
    def answered(self) -> int:
        return self._count(protocol.PREDICTED)

    @property
    def without_boxes(self) -> int:
        return self._count(protocol.NO_BOXES)


class SamBackend:
    """One per process: the model (loaded once, at start), the embedding cache and the served versions."""

    def __init__(self, settings: Settings, segmenter: Segmenter | None = None) -> None:
        self.settings = settings
        try:
            self._allowed_hosts = parse_allowed_hosts(settings.allowed_image_hosts)
        except ValueError as exc:
            raise SystemExit(f"ALLOWED_IMAGE_HOSTS: {exc}") from None
        self.segmenter = segmenter or build_segmenter(settings)
        disk = (DiskEmbeddings(settings.model_dir / "embeddings", settings.disk_cache_mb) if settings.disk_cache
                else None)
        self.cache = EmbeddingCache(settings.cache_mb, disk)
        self.clicks = ClickMemory()  # the editor's earlier click steps: one step per interactive call
        self.prewarmer = Prewarmer(self.segmenter, self.cache, settings.prewarm_queue, settings.encoder_batch_size,
                                   HostLiveCalls.for_model_dir(settings.model_dir))
        self.compute = ComputePool(settings.predict_concurrency)
        # from a compute thread: the runtime's worker threads take its priority (live calls' nice 5)
        self.compute.run(self.segmenter.start, interactive=True)
        self._new_image_s = 0.0  # moving average of a new image's encode + decodes
        self.decoders = ActiveDecoders(settings.model_dir, self.segmenter)
        self._clients: dict[str | None, ProjectClient] = {}
        self._clients_lock = threading.Lock()
        self._fetch_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="image-fetch")

    # -- versions -----------------------------------------------------------------------------------
    def model_version(self, project: str | None) -> str:
        return self.segmenter.model_version(self.decoders.get(project).version)

    def setup(self, project: str | None, hostname: str | None, access_token: str | None) -> str:
        """Remember how to reach this project's Label Studio (for image URLs), start pre-warming its images
        (Label Studio calls /setup when a project is connected); answer the served version."""
        if project and (hostname or access_token):
            save_connection(self.settings, project, hostname, access_token)
        if project:
            self.prewarm_project(project)
        return self.model_version(project)

    # -- predictions --------------------------------------------------------------------------------
    def predict(self, query: PredictRequest, deadline_s: float | None = None) -> Predictions:
        """One answer per task, in task order, within `deadline_s` (default PREDICT_DEADLINE_S; math.inf: no
        limit, as interactive calls have): tasks without boxes at once (in batch: NO_BOXES, Label Studio stores
        nothing and asks again), then tasks in order while time allows (a task whose embedding is cached always, a
        new image only if the time an encode takes is left); the rest are DEFERRED and pre-warmed."""
        tasks = query.tasks
        served = self.decoders.get(query.project)
        version = self.segmenter.model_version(served.version)
        loader = self.client(query.project).images
        budget = self.settings.predict_deadline_s if deadline_s is None else deadline_s
        budget = math.inf if query.interactive else budget
        deadline = time.monotonic() + budget
        answers: list[TaskAnswer | None] = [None] * len(tasks)
        need_image = []
        for index, task in enumerate(tasks):
            if query.interactive or task.has_boxes:
                need_image.append(index)
            elif not query.from_editor:  # batch: nothing stored, asked again once it has boxes
                answers[index] = TaskAnswer(protocol.NO_BOXES)
            else:  # the editor's call without a prompt: an empty answer, never stored
                answers[index] = TaskAnswer(protocol.PREDICTED)
        with self.prewarmer.live():
            for index, image in self._images(loader, tasks, need_image, deadline):
                task = tasks[index]
                if isinstance(image, Exception):
                    log.warning("task image failed", extra={"task": task.id, "error": str(image)})
                    answers[index] = TaskAnswer(protocol.FAILED, error=str(image))
                    continue
                key = image_key(self.segmenter.encoder_identity, image)
                if not self.cache.contains(key) and time.monotonic() + self._new_image_s > deadline:
                    continue  # deferred; a later task may still be cached
                work = partial(self._predict_task, task, image, key, query, served, version)
                try:
                    answers[index] = self.compute.run(work, query.interactive, self._time_left(deadline))
                except Deferred:
                    continue  # the deadline passed while other tasks computed
                except ProtocolError as exc:
                    if query.interactive:
                        raise  # the editor's one request: HTTP 400
                    log.warning("task prompts refused", extra={"task": task.id, "error": str(exc)})
                    answers[index] = TaskAnswer(protocol.FAILED, error=str(exc))  # one bad task never blocks the rest
        late = [index for index in need_image if answers[index] is None]
        for index in late:
            answers[index] = TaskAnswer(protocol.DEFERRED)
        if late and self.settings.prewarm:
            self.prewarmer.submit(self._image_jobs(loader, [tasks[i].image for i in late if tasks[i].image]), soon=True)
        if len(tasks) == 1 and not need_image and tasks[0].image and self.settings.prewarm:
            # one task without prompts: Label Studio asks when a task is opened; its image goes first, so that
            # the annotator's first box or click finds it embedded
            self.prewarmer.submit(self._image_jobs(loader, [tasks[0].image]), first=True)
        return Predictions(tuple(answers), version, deferred=len(late))

    def _images(self, loader: ImageFetcher, tasks: tuple[PredictTask, ...], indices: list[int],
                deadline: float) -> Iterator[tuple[int, np.ndarray | Exception]]:
        """(task index, image or the error that kept it) in order, with at most PREFETCH_IMAGES fetched
        ahead; stops at the deadline (unfetched tasks are not yielded)."""
        ahead: deque[tuple[int, Future]] = deque()
        upcoming = iter(indices)

        def fill() -> None:
            while len(ahead) < max(1, self.settings.prefetch_images):
                index = next(upcoming, None)
                if index is None:
                    return
                ahead.append((index, self._fetch_pool.submit(self._task_image, loader, tasks[index])))

        fill()
        try:
            while ahead:
                index, future = ahead.popleft()
                try:
                    image = future.result(timeout=self._time_left(deadline))
                except FutureTimeout:
                    return
                except (ImageError, ProtocolError) as exc:
                    image = exc
                fill()
                yield index, image
                if time.monotonic() >= deadline:
                    return
        finally:
            for _, future in ahead:
                future.cancel()

    @staticmethod
    def _time_left(deadline: float) -> float | None:
        return None if math.isinf(deadline) else max(0.0, deadline - time.monotonic())

    def _predict_task(self, task: PredictTask, image: np.ndarray, key: str, query: PredictRequest,
                      served, version: str) -> TaskAnswer:
        started = time.perf_counter()
        height, width = image.shape[:2]
        if query.prompt is not None:
            prompts = query.prompt.in_pixels(width, height)
        else:
            prompts = Prompts(boxes=task.boxes(width, height))
        if len(prompts.boxes) > self.settings.max_boxes:
            raise ProtocolError(f"task {task.id} has {len(prompts.boxes)} boxes; "
                                f"at most {self.settings.max_boxes} (MAX_BOXES_PER_TASK)")
        if len(prompts.points) > self.settings.max_clicks:
            raise ProtocolError(f"task {task.id} has {len(prompts.points)} clicks; "
                                f"at most {self.settings.max_clicks} (MAX_CLICKS_PER_TASK)")
        cached = False
        masks = []
        if prompts.boxes or prompts.points:
            embedding, cached = self.cache.get_or_compute(key, lambda: self.segmenter.embed(image))
            history = self.clicks.scope(key, version) if prompts.points else None
            masks = self.segmenter.decode(embedding, prompts, served.module, served.calibration, history)
        seconds = time.perf_counter() - started
        if not cached:  # what a new image costs: the next call's deferral bound
            self._new_image_s = seconds if not self._new_image_s else 0.7 * self._new_image_s + 0.3 * seconds
        log.info("task predicted", extra={"task": task.id, "boxes": len(prompts.boxes),
                                          "points": len(prompts.points), "embedding_cached": cached,
                                          "ms": round(1000 * seconds, 1)})
        return TaskAnswer(protocol.PREDICTED, tuple(masks))

    @staticmethod
    def _task_image(loader: ImageFetcher, task: PredictTask) -> np.ndarray:
        if task.image is None:
            raise ProtocolError(task.image_error or f"task {task.id} has no image")
        return loader.load(task.image.url, task.image.task_id)

    # -- pre-warming ------------------------------------------------------------------------------------
    def prewarm_tasks(self, project: str | None, images: list[ImageRef], soon: bool = False) -> int:
        """Queue the tasks' images for background embedding; returns how many were queued. soon: tasks just
        imported, ahead of a project's backlog."""
        if not self.settings.prewarm:
            return 0
        return self.prewarmer.submit(self._image_jobs(self.client(project).images, images), soon=soon)

    def prewarm_project(self, project: str, every_s: float = 3600.0) -> bool:
        """Queue every task image of the project, listed through Label Studio's API in a background thread;
        at most once per `every_s` per project across processes (a marker file's mtime). True if started."""
        marker = connection_path(self.settings, project)
        if not self.settings.prewarm or marker is None:
            return False
        marker = marker.with_name("prewarmed")
        try:
            if time.time() - marker.stat().st_mtime < every_s:
                return False
        except OSError:
            pass
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        threading.Thread(target=self._prewarm_listed, args=(project,), name=f"prewarm-list-{project}",
                         daemon=True).start()
        return True

    def _prewarm_listed(self, project: str) -> None:
        client = self.client(project)
        if not client.connected:
            log.warning("prewarm skipped: no Label Studio URL/token", extra={"project": project})
            return
        listed = queued = 0
        try:
            for listed_now, images in client.task_images():
                listed += listed_now
                queued += self.prewarm_tasks(project, images)
        except (ConnectError, ProtocolError) as exc:
            log.warning("prewarm listing failed", extra={"project": project, "error": str(exc)})
        log.info("prewarm project listed", extra={"project": project, "tasks": listed, "queued": queued})

    def embed_ahead(self, project: str | None, images: list[ImageRef]) -> None:
        """Encode the tasks' new images now, ENCODER_BATCH at a time (bulk jobs on a GPU), so that predicting
        them finds their embeddings cached. Nothing to do where batching does not pay."""
        if self.prewarmer.batch > 1:
            self.prewarmer.submit(self._image_jobs(self.client(project).images, images))
            self.prewarmer.wait_idle(3600)

    @staticmethod
    def _image_jobs(loader: ImageFetcher, images: list[ImageRef]) -> Iterator[ImageJob]:
        for image in images:
            yield ImageJob(loader, image.url, image.task_id)

    # -- Label Studio connection ----------------------------------------------------------------------
    def client(self, project: str | None) -> ProjectClient:
        """The project's Label Studio client (images and REST, one token), rebuilt when its URL or token
        changes (a new /setup, a rejected key)."""
        source = image_source(self.settings, project, self._allowed_hosts)
        with self._clients_lock:
            client = self._clients.get(project)
            if client is None or client.source != source:
                client = self._clients[project] = ProjectClient(source, project)
            return client
