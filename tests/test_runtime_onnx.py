"""INFERENCE_RUNTIME=auto/onnxruntime: the image encoder exported to ONNX (in the background, by a child process,
while torch serves) and run by ONNX Runtime, against torch fp32 on the real LiteMedSAM weights and real images of
both shared datasets; a session per priority; the cached export's checks (stale, corrupt -> rebuilt), a stop
mid-export, the fallback to torch, and the setting. The real encoder is exported once for the module (~15 s on 2
cores); the cache checks use a tiny stand-in encoder, so they export in well under a second."""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ml_backend.logs import JsonFormatter
from ml_backend.settings import Settings
from tests import dataset
from trainer import onnx_encoder, onnx_export
from trainer.data import load_coco
from trainer.inference_runtime import InferenceRuntime
from trainer.models import LoadedModel
from trainer.onnx_encoder import OnnxImageEncoder
from trainer.onnx_export import export_path, load_or_export
from trainer.runtime import Segmenter
from trainer.types import Box, Prompts

SHARED = dataset.ROOT.parent / "shared" / "datasets"
IMAGES_PER_DATASET = 2
BOXES_PER_IMAGE = 5


@lru_cache(maxsize=2)
def _test_images(name: str) -> list:
    return load_coco(SHARED / name).split("test")[:IMAGES_PER_DATASET]


def _samples() -> list[tuple[str, int]]:
    return [(name, n) for name in ("dsb2018_nuclei", "coco_everyday") for n in range(IMAGES_PER_DATASET)]


def _image_and_boxes(name: str, index: int) -> tuple[np.ndarray, list[Box]]:
    image = _test_images(name)[index]
    return image.load_image(), [sample.box for sample in image.samples[:BOXES_PER_IMAGE]]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model_dir") / "exports"


@pytest.fixture(scope="module")
def onnx_segmenter(lite_medsam: LoadedModel, segmenter: Segmenter, export_dir: Path) -> Segmenter:
    """The default model with its encoder on ONNX Runtime (the default, auto, on this CPU), exported once for the
    module; torch serves while the export runs in the background."""
    onnx = Segmenter(lite_medsam, runtime="auto", export_dir=export_dir)
    assert isinstance(onnx.encoder, OnnxImageEncoder)
    onnx.start()
    image = dataset.load_image(dataset.splits()["test"][0])
    assert torch.equal(onnx.embed(image).features, segmenter.embed(image).features)  # torch, not waiting
    assert onnx.encoder.runtime is InferenceRuntime.TORCH and list(export_dir.glob("*.onnx")) == []
    assert onnx.encoder.ready(timeout_s=300), onnx.encoder._fallback
    assert onnx.encoder.runtime is InferenceRuntime.ONNXRUNTIME
    assert onnx.encoder.export_seconds is not None and onnx.encoder.export_reason == "none cached"
    return onnx


@pytest.mark.parametrize("name,index", _samples())
def test_onnxruntime_masks_agree_with_torch_fp32(segmenter, onnx_segmenter, name, index):
    image, boxes = _image_and_boxes(name, index)
    assert boxes
    reference, candidate = segmenter.embed(image), onnx_segmenter.embed(image)
    assert candidate.features.shape == reference.features.shape == (1, 256, 64, 64)
    assert candidate.features.dtype == torch.float32
    assert (candidate.features - reference.features).abs().max() < 1e-3
    prompts = Prompts(boxes=tuple(boxes))
    for a, b in zip(segmenter.decode(reference, prompts), onnx_segmenter.decode(candidate, prompts)):
        assert dataset.iou(a.full(), b.full()) >= 0.99


def test_embed_many_runs_each_image_through_onnxruntime(onnx_segmenter):
    images = [_image_and_boxes(*sample)[0] for sample in (_samples()[0], _samples()[-1])]
    many = onnx_segmenter.embed_many(images)
    for image, embedding in zip(images, many):
        single = onnx_segmenter.embed(image)
        assert embedding.original_size == single.original_size
        assert torch.allclose(embedding.features, single.features, atol=1e-5)


def test_a_cached_export_is_loaded_not_rebuilt(lite_medsam, onnx_segmenter, export_dir):
    again = OnnxImageEncoder(lite_medsam, export_dir)
    assert again.ready() and again.export_seconds is None
    assert [p.name for p in export_dir.glob("*.onnx")] == [export_path(lite_medsam, export_dir).name]


def _nice_threads() -> dict[int, int]:
    """This process's threads: native id -> nice value (Linux /proc)."""
    threads = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            threads[int(task.name)] = int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])
        except FileNotFoundError:  # ended meanwhile
            pass
    return threads


def test_each_priority_encodes_on_threads_of_its_own_priority(onnx_segmenter):
    """ONNX Runtime's worker threads take their creator's nice value: pre-warm (nice 15) gets a session whose
    threads run at 15, so its encodes stay behind live calls' as torch's do."""
    image = dataset.load_image(dataset.splits()["test"][1])
    reference = onnx_segmenter.embed(image)
    before = _nice_threads()
    result = {}

    def low_priority() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 15)
        result["embedding"] = onnx_segmenter.embed(image)
        result["tid"] = threading.get_native_id()

    thread = threading.Thread(target=low_priority)
    thread.start()
    thread.join()
    assert 15 in onnx_segmenter.encoder._sessions
    new = {tid: nice for tid, nice in _nice_threads().items() if tid not in before and tid != result["tid"]}
    assert new and set(new.values()) == {15}  # the new session's worker threads
    assert torch.allclose(result["embedding"].features, reference.features, atol=1e-5)


def test_stopping_the_process_mid_export_ends_the_child_and_leaves_no_file(lite_medsam, tmp_path):
    encoder = OnnxImageEncoder(lite_medsam, tmp_path)
    encoder.start()
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".tmp-*.onnx")):  # the child is exporting
        assert time.monotonic() < deadline and not encoder._ready.is_set()
        time.sleep(0.1)
    assert encoder.stop(timeout_s=30)
    assert encoder._child.returncode != 0 and encoder.runtime is InferenceRuntime.TORCH
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []


# -- the cached export's checks, on a tiny stand-in encoder (fast) ---------------------------------------------------
def tiny_model(seed: int) -> LoadedModel:
    """A LoadedModel whose encoder is one conv (32 x 32 -> 8 x 8 x 8): what the export code touches."""
    torch.manual_seed(seed)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.GELU()).eval()
    return LoadedModel(SimpleNamespace(image_encoder=encoder), "lite_medsam", str(seed) * 64, 32, "minmax")


def _serves(model: LoadedModel, session) -> bool:
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = model.sam.image_encoder(x).numpy()
    return bool(np.allclose(session.run(None, {"image": x.numpy()})[0], expected, atol=1e-5))


def test_a_stale_export_is_rebuilt(tmp_path):
    model, other = tiny_model(0), tiny_model(1)
    _, seconds = load_or_export(other, tmp_path)
    assert seconds is not None
    path = export_path(model, tmp_path)
    path.write_bytes(export_path(other, tmp_path).read_bytes())  # another model's export under this one's name
    session, seconds = load_or_export(model, tmp_path)
    assert seconds is not None  # rebuilt
    assert _serves(model, session) and not _serves(other, session)
    _, seconds = load_or_export(model, tmp_path)
    assert seconds is None  # and then used


def test_an_export_replaces_the_same_weights_exports_unused_for_a_week(tmp_path):
    model, other = tiny_model(0), tiny_model(1)
    prefix = export_path(model, tmp_path).name.split("-ort")[0]
    old_version = tmp_path / f"{prefix}-ort1.0.0-torch2.0-opset17.onnx"  # an upgrade ago, a week unused
    recent = tmp_path / f"{prefix}-ort1.1.0-torch2.0-opset17.onnx"  # another install sharing the folder uses it
    abandoned = tmp_path / ".tmp-killed.onnx"  # an export killed mid-way, an hour ago
    another_model = export_path(other, tmp_path).name.split("-ort")[0] + "-ort1.0.0-torch2.0-opset17.onnx"
    for path, age_s in ((old_version, 8 * 86400), (recent, 86400), (abandoned, 3600),
                        (tmp_path / another_model, 30 * 86400)):
        path.write_bytes(b"an export")
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    load_or_export(model, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == sorted(
        [export_path(model, tmp_path).name, recent.name, another_model])
    assert not abandoned.exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "weights", "no fingerprint"])
def test_a_corrupt_export_is_rebuilt(tmp_path, damage):
    import onnx

    model = tiny_model(0)
    load_or_export(model, tmp_path)
    path = export_path(model, tmp_path)
    if damage == "garbage":
        path.write_bytes(b"\x00not an onnx file" * 64)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        graph = onnx.load(str(path))
        if damage == "weights":  # still parses, key still right: only the probe run can tell
            weight = graph.graph.initializer[0]
            values = onnx.numpy_helper.to_array(weight) * 1.5
            weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
        else:
            kept = [p for p in graph.metadata_props if p.key != onnx_export.PROBE_PROP]
            del graph.metadata_props[:]
            graph.metadata_props.extend(kept)
        onnx.save(graph, str(path))
    with pytest.raises(onnx_export.ExportError):
        onnx_export.open_export(path, onnx_export.export_key(model), 32, 1)
    session, seconds = load_or_export(model, tmp_path)
    assert seconds is not None and _serves(model, session)
    onnx_export.open_export(path, onnx_export.export_key(model), 32, 1)  # the file on disk is good again


# -- the fallback to torch ----------------------------------------------------------------------------------------
def _fallback_lines(caplog) -> list[dict]:
    return [json.loads(JsonFormatter().format(r)) for r in caplog.records
            if r.name == onnx_encoder.__name__ and r.levelno >= logging.WARNING]


def test_an_unavailable_runtime_falls_back_to_torch_with_one_log_line(lite_medsam, segmenter, tmp_path,
                                                                         monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    caplog.set_level(logging.INFO, logger=onnx_encoder.__name__)
    fallback = Segmenter(lite_medsam, runtime="onnxruntime", export_dir=tmp_path / "exports")
    image = dataset.load_image(dataset.splits()["test"][0])
    reference = segmenter.embed(image)
    assert torch.equal(fallback.embed(image).features, reference.features)
    assert not fallback.encoder.ready() and fallback.encoder.runtime is InferenceRuntime.TORCH  # asked again: no line
    (line,) = _fallback_lines(caplog)
    assert line["level"] == "WARNING" and "falling back to torch" in line["event"]
    assert line["runtime"] == "onnxruntime" and line["fallback"] == "torch" and "onnxruntime" in line["reason"]


def test_a_failed_export_falls_back_and_leaves_no_file(tmp_path, monkeypatch, caplog):
    def broken(model, key, tmp):
        tmp.write_bytes(b"half an export")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(onnx_export, "_write_export", broken)
    model = tiny_model(0)
    encoder = OnnxImageEncoder(model, tmp_path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(encoder(x), model.sam.image_encoder(x))
        assert not encoder.ready()
        encoder(x)
    (line,) = _fallback_lines(caplog)
    assert "exporter crashed" in line["reason"]
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".tmp-*"))


# -- the setting ----------------------------------------------------------------------------------------------------
def test_the_setting_is_validated():
    assert Settings().inference_runtime is InferenceRuntime.AUTO
    assert Settings.from_env({"INFERENCE_RUNTIME": "onnxruntime"}).inference_runtime is InferenceRuntime.ONNXRUNTIME
    assert Settings.from_env({"INFERENCE_RUNTIME": " Auto "}).inference_runtime is InferenceRuntime.AUTO
    with pytest.raises(SystemExit, match=r"INFERENCE_RUNTIME='tensorrt' is invalid: .*torch \| onnxruntime \| auto"):
        Settings.from_env({"INFERENCE_RUNTIME": "tensorrt"})
    with pytest.raises(ValueError, match="unknown inference runtime 'openvino'"):
        Segmenter(tiny_model(0), runtime="openvino")
    assert InferenceRuntime.AUTO.resolve("cpu") is InferenceRuntime.ONNXRUNTIME  # installed here
    assert InferenceRuntime.AUTO.resolve("cuda") is InferenceRuntime.TORCH
    assert isinstance(Segmenter(tiny_model(0), runtime="auto", export_dir=Path("unused")).encoder, OnnxImageEncoder)
    bf16 = Segmenter(tiny_model(0), encoder_bf16=True, runtime="auto", export_dir=Path("unused"))
    assert isinstance(bf16.encoder, torch.nn.Module)  # bf16 autocast is torch's: auto keeps torch


def test_the_server_builds_the_runtime_the_settings_name(tmp_path):
    from ml_backend.backend import build_segmenter

    settings = Settings(model_dir=tmp_path, inference_runtime=InferenceRuntime.ONNXRUNTIME)
    serving = build_segmenter(settings)
    assert isinstance(serving.encoder, OnnxImageEncoder) and serving.encoder.export_dir == tmp_path / "exports"
    shared = Settings.from_env({"MODEL_DIR": str(tmp_path), "EXPORT_DIR": str(tmp_path / "shared")})
    assert build_segmenter(shared).encoder.export_dir == tmp_path / "shared"
    assert isinstance(build_segmenter(settings, serving=False).encoder, torch.nn.Module)  # training: torch
    assert not (tmp_path / "exports").exists()  # exported on first use, not at build
