"""Which decoder each project serves: follows the registry's active pointer on every call."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from segment_anything.modeling import MaskDecoder

from .calibration import Calibration
from .registry import Registry, RegistryError
from .runtime import BASE_VERSION, Segmenter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedDecoder:
    version: str
    module: MaskDecoder | None = None  # None: the base model's decoder
    calibration: Calibration | None = None  # the version's score recalibration (its manifest), if any


class ActiveDecoders:
    """Per project, the decoder of its active registry version, loaded once and swapped on change.

    Reading the pointer is one small file read, so a version promoted by the trainer is served by every
    worker process on its next request. A version that fails to load is refused (logged) and the
    previously served one stays.
    """

    def __init__(self, model_dir: Path, segmenter: Segmenter) -> None:
        self.model_dir = Path(model_dir)
        self.segmenter = segmenter
        self._served: dict[str, ServedDecoder] = {}
        self._refused: dict[str, str] = {}  # project -> the version refused last (not re-read on every call)
        self._lock = threading.Lock()

    def get(self, project: str | None) -> ServedDecoder:
        base = ServedDecoder(BASE_VERSION)
        if project is None:
            return base
        try:
            registry = Registry(self.model_dir, project)
        except RegistryError:
            return base
        wanted = registry.active() or BASE_VERSION
        with self._lock:
            current = self._served.get(project, base)
            if current.version == wanted or self._refused.get(project) == wanted:
                return current
            try:
                served = ServedDecoder(wanted) if wanted == BASE_VERSION else self._load(registry, wanted)
            except (RegistryError, RuntimeError) as exc:
                self._refused[project] = wanted
                log.error("decoder version refused", extra={"project": project, "version": wanted,
                                                             "error": str(exc), "serving": current.version})
                return current
            self._refused.pop(project, None)
            self._served[project] = served
            log.info("decoder version served", extra={"project": project, "version": wanted})
            return self._served[project]

    def _load(self, registry: Registry, version: str) -> ServedDecoder:
        """The version's decoder and calibration, refused when it was trained on top of another base model."""
        registry.check_base_model(version, self.segmenter.model.identity)
        module = self.segmenter.fine_tuned_decoder(registry.load_decoder(version))
        return ServedDecoder(version, module, Calibration.from_dict(registry.manifest(version).get("calibration")))
