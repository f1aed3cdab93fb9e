"""Checkpoint registry: per project, versioned decoder weights (safetensors) + manifest, and an active pointer.

Layout under MODEL_DIR/projects/<project>/:
    versions/<id>/decoder.safetensors   the fine-tuned mask decoder's state dict
    versions/<id>/manifest.json         base model, data summary, hyper-parameters, metrics, parent, time, sha256
    active.json                         {"version": <id> | null, "history": [<ids activated before>]}
Every write goes to a temporary name first and is renamed into place, so a crash leaves no half version.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .files import write_atomic
from .models import file_sha256

PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION_NAME = re.compile(r"^v\d{4,}$")


class RegistryError(RuntimeError):
    """An unknown or damaged version, or a bad project name."""


@dataclass(frozen=True)
class VersionInfo:
    version: str
    manifest: dict

    @property
    def promoted(self) -> bool:
        return bool(self.manifest.get("promoted"))

    def summary(self) -> dict:
        """What a person picks a version by: the gate's mIoUs (served model vs this one), the evidence behind
        them (gate objects and images, the gain and its lower bound: trainer/evidence.py), why it was or was not
        promoted, and how well this version's score predicted the gate set's IoUs (Spearman per object and per
        task, calibration error, AUROC for bad masks). Versions from before the gate split report their val
        mIoUs."""
        metrics = self.manifest.get("metrics", {})
        score = metrics.get("gate_score") or {}
        return {"version": self.version, "promoted": self.promoted, "created_at": self.manifest.get("created_at"),
                "parent": self.manifest.get("parent"), "reason": self.manifest.get("reason"),
                "loss": self.manifest.get("hyperparameters", {}).get("loss"),
                "gate_miou_current": metrics.get("gate_miou_current", metrics.get("val_miou_base")),
                "gate_miou_new": metrics.get("gate_miou_new", metrics.get("val_miou_new")),
                "early_stop_miou_best": metrics.get("early_stop_miou_best"),
                **{k: metrics.get(k) for k in ("gate_objects", "gate_images", "gate_gain", "gate_gain_lower")},
                "calibrated": bool(self.manifest.get("calibration")),
                **{k: score.get(k) for k in ("spearman_object", "spearman_task", "ece", "auroc_bad")}}


# Fault injection for the tests: called with the name of each step of write_version / activate / prune as it is
# reached (tests/hooked.py sets one that SIGKILLs the process at a chosen step); None in the product.
crash_hook: Callable[[str], None] | None = None


def _crash_point(step: str) -> None:
    if crash_hook is not None:
        crash_hook(step)


def _write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True)),
                 before_replace=lambda: _crash_point("before-pointer-replace"))


class Registry:
    """Versions of one project's decoder. Safe to read from many processes; one writer at a time."""

    def __init__(self, model_dir: Path | str, project: str, keep_last: int = 5) -> None:
        if not PROJECT_NAME.match(str(project)):
            raise RegistryError(f"project name {project!r} must be 1-64 letters, digits, '_', '.', '-'")
        self.root = Path(model_dir) / "projects" / str(project)
        self.versions_dir = self.root / "versions"
        self.keep_last = keep_last

    # -- reading ------------------------------------------------------------------------------------
    def versions(self) -> list[VersionInfo]:
        """All complete versions, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        infos = []
        for path in sorted(self.versions_dir.iterdir()):
            if VERSION_NAME.match(path.name) and (path / "manifest.json").is_file():
                try:
                    infos.append(VersionInfo(path.name, json.loads((path / "manifest.json").read_text())))
                except (OSError, json.JSONDecodeError):
                    continue
        return infos

    def _pointer(self) -> dict:
        try:
            data = json.loads((self.root / "active.json").read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, json.JSONDecodeError):
            return {}

    def active(self) -> str | None:
        """The active version id, or None when the base model is served."""
        version = self._pointer().get("version")
        return version if isinstance(version, str) and VERSION_NAME.match(version) else None

    def manifest(self, version: str) -> dict:
        path = self._version_dir(version) / "manifest.json"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RegistryError(f"version {version} of project {self.root.name} has no readable manifest") from exc

    def check_base_model(self, version: str, identity: str) -> None:
        """Raise RegistryError unless the version was fine-tuned on the base model with this identity."""
        trained_on = self.manifest(version).get("base_model", {}).get("identity")
        if trained_on != identity:
            raise RegistryError(f"version {version} was trained on base model {trained_on}, not on {identity}")

    def load_decoder(self, version: str) -> dict[str, torch.Tensor]:
        """The version's decoder state dict, checked against the sha256 its manifest recorded."""
        from safetensors.torch import load_file

        manifest = self.manifest(version)
        path = self._version_dir(version) / "decoder.safetensors"
        if not path.is_file():
            raise RegistryError(f"version {version}: decoder.safetensors is missing")
        if file_sha256(path) != manifest.get("sha256"):
            raise RegistryError(f"version {version}: decoder.safetensors does not match its recorded sha256")
        try:
            return load_file(str(path))
        except Exception as exc:
            raise RegistryError(f"version {version}: decoder.safetensors cannot be read: {exc}") from exc

    def _version_dir(self, version: str) -> Path:
        if not isinstance(version, str) or not VERSION_NAME.match(version):
            raise RegistryError(f"{version!r} is not a version id (like v0001)")
        path = self.versions_dir / version
        if not path.is_dir():
            raise RegistryError(f"project {self.root.name} has no version {version}")
        return path

    # -- writing ------------------------------------------------------------------------------------
    def write_version(self, decoder_state: dict[str, torch.Tensor], manifest: dict) -> str:
        """Store a new version atomically and return its id (not activated)."""
        from safetensors.torch import save_file

        self.versions_dir.mkdir(parents=True, exist_ok=True)
        staging = self.versions_dir / f".staging-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            weights = staging / "decoder.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in decoder_state.items()}, str(weights))
            _crash_point("weights-written")
            # every vNNNN name counts, complete or not, so a leftover directory never blocks the rename
            numbers = [int(p.name[1:]) for p in self.versions_dir.iterdir() if VERSION_NAME.match(p.name)]
            version = f"v{max(numbers, default=0) + 1:04d}"
            record = dict(manifest, version=version, sha256=file_sha256(weights),
                          created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            (staging / "manifest.json").write_text(json.dumps(record, indent=2, sort_keys=True))
            _crash_point("manifest-written")
            for path in (weights, staging / "manifest.json"):
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
            _crash_point("before-rename")
            os.rename(staging, self.versions_dir / version)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _crash_point("version-written")
        return version

    def activate(self, version: str | None) -> None:
        """Serve this version (None: the base model). The version must load cleanly first."""
        if version is not None:
            self.load_decoder(version)
        pointer = self._pointer()
        history = [v for v in pointer.get("history", []) if isinstance(v, str)]
        current = pointer.get("version")
        if current != version:
            history.append(current)
        self.root.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(self.root / "active.json", {"version": version, "history": history[-50:]})
        _crash_point("activated")

    def rollback(self) -> str | None:
        """Re-activate the version that was active before the current one; returns it (None = base)."""
        pointer = self._pointer()
        history = [v for v in pointer.get("history", []) if v is None or isinstance(v, str)]
        existing = {i.version for i in self.versions()}
        while history:
            previous = history.pop()
            if previous is None or previous in existing:
                _write_json_atomic(self.root / "active.json", {"version": previous, "history": history})
                return previous
        raise RegistryError(f"project {self.root.name} has no earlier version to roll back to")

    def prune(self) -> list[str]:
        """Delete all but the newest keep_last versions and the active one; returns what was deleted."""
        infos = self.versions()
        keep = {i.version for i in infos[-self.keep_last:]} | {self.active()}
        removed = []
        for info in infos:
            if info.version not in keep:
                # renamed out of the listing first (atomic), so a crash never leaves a half-deleted version
                trash = self.versions_dir / f".staging-{uuid.uuid4().hex}"
                try:
                    os.rename(self.versions_dir / info.version, trash)
                except FileNotFoundError:  # pruned by someone else meanwhile
                    continue
                _crash_point("prune-renamed")
                shutil.rmtree(trash, ignore_errors=True)
                removed.append(info.version)
        for stale in self.versions_dir.glob(".staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return removed
