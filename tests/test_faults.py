"""Faults: kill -9 at every step of a registry write and of a training job, disk full during a checkpoint write.

Invariants checked after every fault: each version the registry lists loads (sha256 verified), the active
pointer names nothing or a loadable version, leftovers of a dead writer are ignored and pruned, a killed job
ends `failed` with the signal named (never stuck `running`), the job database is intact and every event
recorded before the fault is still there, and `ActiveDecoders` (what the backend serves) returns the active
decoder or keeps the one it served.

Registry writes are killed in processes forked from a "zygote" that has already imported torch and loaded a
real MaskDecoder state dict, so a kill costs a fork, not a 3 s interpreter start. Each step is also hit
deterministically through `trainer.registry.crash_hook` (set by the tests, tests/hooked.py `crash_at`), which
SIGKILLs the writer right there. Training jobs run the production job body (`trainer.jobs.run_job`) on a 4-image COCO
subset of dsb2018 under the real `Dispatcher`.

The scenario functions return plain dicts so benchmarks/robustness.py can re-run them for its figures.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import pytest

from tests.dataset import make_coco
from trainer.jobs import JobStore
from trainer.registry import Registry

from tests.faults import (BASE, PROJECT, QUIET, SUBSET, Zygote, database_problems, registry_kill_loop,
                          registry_problems, registry_step_kills, run_disk_full, save_decoder_state, served_problems,
                          stat_signal)
from tests.job_faults import JOB_KILLS, job_command, run_dispatcher_killed, run_good_job, run_killed_job


@pytest.fixture(scope="module")
def state_path(tmp_path_factory) -> Path:
    return save_decoder_state(tmp_path_factory.mktemp("state") / "decoder.safetensors")


@pytest.fixture(scope="module")
def zygote(state_path) -> Zygote:
    zygote = Zygote(state_path)
    yield zygote
    zygote.close()


@pytest.fixture(scope="module")
def decoders(segmenter):
    from trainer.active import ActiveDecoders

    return lambda model_dir: ActiveDecoders(model_dir, segmenter)


def test_kill_9_at_each_registry_step(tmp_path, zygote, decoders):
    served = decoders(tmp_path)
    results = registry_step_kills(zygote, tmp_path, lambda: served_problems(served, tmp_path))
    for step, result in results.items():
        assert result["problems"] == [], (step, result)
    versions_before, active_before = results["weights-written"]["before"]
    assert versions_before == [] and active_before is None
    # before the rename nothing is listed; from the rename on the new version is complete and loadable
    assert results["weights-written"]["after"] == results["manifest-written"]["after"] == \
        results["before-rename"]["after"] == ([], None)
    assert results["weights-written"]["staging_left"] >= 1  # the dead writer's staging dir, ignored
    assert results["version-written"]["after"] == (["v0001"], None)  # written, not yet activated
    assert results["before-pointer-replace"]["after"] == (["v0001", "v0002"], None)  # pointer untouched
    assert results["activated"]["after"] == (["v0001", "v0002", "v0003"], "v0003")
    versions, active = results["prune-renamed"]["after"]
    assert len(versions) == 3 and active == versions[-1]  # the pruned version vanished from the listing at once
    registry = Registry(tmp_path, PROJECT)
    assert list(registry.root.glob(".tmp-*.json"))  # the dead activate's temp pointer: left, never read
    registry.prune()
    assert not list(registry.versions_dir.glob(".staging-*")) and registry_problems(tmp_path) == []


def test_kill_9_registry_writer_at_spread_out_moments(tmp_path, zygote, decoders):
    served = decoders(tmp_path)
    result = registry_kill_loop(zygote, tmp_path, kills=15, budget_s=40,
                                check_served=lambda: served_problems(served, tmp_path))
    assert result["kills"] >= 10 and result["problems"] == [] and result["survived"] == result["kills"], result
    registry = Registry(tmp_path, PROJECT)
    assert registry.active() is not None  # the writers got through whole cycles between kills
    registry.prune()
    assert not list(registry.versions_dir.glob(".staging-*"))
    assert len(registry.versions()) <= 3 + 1 and registry_problems(tmp_path) == []
    # the next writer carries on numbering past everything left behind
    pid = zygote.spawn(tmp_path, PROJECT, "version-written", 10**6)
    assert stat_signal(zygote.wait(pid)) == "SIGKILL" and registry_problems(tmp_path) == []


def test_leftover_incomplete_version_directory_does_not_block_writes(tmp_path, state_path):
    from safetensors.torch import load_file

    registry = Registry(tmp_path, PROJECT)
    state = load_file(str(state_path))
    registry.activate(registry.write_version(state, BASE))
    (registry.versions_dir / "v0002").mkdir()  # e.g. half deleted by an older pruner: no manifest
    (registry.versions_dir / "v0002" / "decoder.safetensors").write_bytes(b"partial")
    assert [i.version for i in registry.versions()] == ["v0001"]
    assert registry.write_version(state, BASE) == "v0003"
    assert registry_problems(tmp_path) == []


def test_disk_full_during_checkpoint_write(tmp_path, state_path):
    from safetensors.torch import load_file

    registry = Registry(tmp_path, PROJECT)
    registry.activate(registry.write_version(load_file(str(state_path)), BASE))
    store = JobStore(tmp_path / "jobs.sqlite")
    for _ in range(3):
        store.record_event(PROJECT, "ANNOTATION_CREATED", 1, QUIET)
    # 1 MiB: the 16 MB decoder cannot be written; the small job database still can
    out = run_disk_full(tmp_path, state_path, 1 << 20)
    assert "write" not in out and "File too large" in out["write_error"], out
    assert [i.version for i in registry.versions()] == ["v0001"] and registry.active() == "v0001"
    assert not list(registry.versions_dir.glob(".staging-*"))  # the failed write cleaned up after itself
    assert registry_problems(tmp_path) == []
    assert "event" in out and store.count_events() == 4
    # 4 KiB: now the job database cannot grow either; the event is refused whole, earlier ones are intact
    out = run_disk_full(tmp_path, state_path, 4096)
    assert "write_error" in out and "event_error" in out, out
    assert store.count_events() == 4 and database_problems(tmp_path / "jobs.sqlite") == []
    assert registry.active() == "v0001" and registry_problems(tmp_path) == []


def test_served_decoder_survives_corrupt_files(tmp_path, state_path, decoders):
    """A corrupt decoder for the active version is refused and the previously served version kept."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(state_path))
    registry = Registry(tmp_path, PROJECT)
    served = decoders(tmp_path)
    v1 = registry.write_version({k: v + 1 for k, v in state.items()}, BASE)
    registry.activate(v1)
    assert served.get(PROJECT).version == v1

    def activate_then_damage(damage: Callable[[Path], None]) -> str:
        version = registry.write_version(state, BASE)
        registry.activate(version)  # activate checks the files first; the damage comes after
        damage(registry.versions_dir / version)
        return version

    def flip_bytes(path: Path) -> None:
        data = bytearray((path / "decoder.safetensors").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (path / "decoder.safetensors").write_bytes(bytes(data))

    def truncate(path: Path) -> None:
        with open(path / "decoder.safetensors", "r+b") as handle:
            handle.truncate(1000)

    def garbage_with_matching_sha(path: Path) -> None:  # sha256 "right", content not safetensors
        from trainer.models import file_sha256

        (path / "decoder.safetensors").write_bytes(b"\x00garbage" * 100)
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["sha256"] = file_sha256(path / "decoder.safetensors")
        (path / "manifest.json").write_text(json.dumps(manifest))

    def wrong_shapes_with_matching_sha(path: Path) -> None:  # a valid file for some other network
        from trainer.models import file_sha256

        save_file({k: v[..., :1].contiguous() if v.ndim else v for k, v in state.items()},
                  str(path / "decoder.safetensors"))
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["sha256"] = file_sha256(path / "decoder.safetensors")
        (path / "manifest.json").write_text(json.dumps(manifest))

    def missing_manifest(path: Path) -> None:
        (path / "manifest.json").unlink()

    for damage in (flip_bytes, truncate, garbage_with_matching_sha, wrong_shapes_with_matching_sha, missing_manifest):
        bad = activate_then_damage(damage)
        for _ in range(2):  # refused on every request, not only the first
            now = served.get(PROJECT)
            assert now.version == v1, damage.__name__
            assert now.module.state_dict()["output_upscaling.0.bias"].equal(state["output_upscaling.0.bias"] + 1)
        assert registry.active() == bad  # the pointer is left alone; the operator sees the refusal in the log
        # a worker starting now has nothing earlier to keep: it serves the base model, never the damaged file
        assert decoders(tmp_path).get(PROJECT).version == "base", damage.__name__
    registry.activate(v1)
    assert served.get(PROJECT).version == v1


# -- training jobs ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return make_coco(tmp_path_factory.mktemp("coco"), SUBSET)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, coco) -> Path:
    """A model dir with one promoted version (and the embedding cache warm) from a real job."""
    model_dir = tmp_path_factory.mktemp("jobs")
    result = run_good_job(model_dir, coco)
    assert result["state"] == "succeeded" and result["result"]["promoted"], result
    return model_dir


@pytest.mark.parametrize("moment", list(JOB_KILLS))
def test_kill_9_training_job(moment, trained_dir, coco, tmp_path, decoders):
    kill = JOB_KILLS[moment]
    model_dir = tmp_path if kill.get("cold") else trained_dir  # a fresh dir: the embeddings are computed
    served = decoders(model_dir)
    served.get(PROJECT)
    result = run_killed_job(model_dir, coco, kill)
    assert result["problems"] == [] and result["events_lost"] == 0, result
    assert result["state"] == "failed" and "killed by signal SIGKILL" in result["error"]
    if moment == "after promotion, before the job is recorded":
        assert result["active_after"] != result["active_before"]  # promoted and complete, the job still failed
    elif moment != "writing the checkpoint":
        assert result["active_after"] == result["active_before"]
    assert served_problems(served, model_dir) == []


def test_kill_9_dispatcher_and_its_training_child(trained_dir, coco):
    result = run_dispatcher_killed(trained_dir, coco)
    assert result["problems"] == [] and result["events_lost"] == 0, result
    assert result["active_after"] == result["active_before"]


def test_disk_full_during_a_training_jobs_checkpoint(trained_dir, coco):
    """The job fails with the write error, nothing is promoted, the events stay (the embeddings are cached)."""
    from trainer.jobs import Dispatcher

    store = JobStore(trained_dir / "jobs.sqlite")
    registry = Registry(trained_dir, PROJECT)
    active, versions = registry.active(), [i.version for i in registry.versions()]
    leftovers = set(registry.versions_dir.glob(".staging-*"))  # of the writers killed above
    store.record_event(PROJECT, "START_TRAINING", 0, QUIET, explicit=True)
    events = store.count_events()
    command = job_command(trained_dir, coco, fsize=2 << 20)
    job = Dispatcher(store, trained_dir, command, env={**os.environ, "LOG_LEVEL": "WARNING"}).run_once()
    assert job.state == "failed" and "File too large" in job.error, job
    assert (registry.active(), [i.version for i in registry.versions()]) == (active, versions)
    assert set(registry.versions_dir.glob(".staging-*")) == leftovers  # the failed write removed its own
    assert store.count_events() == events
    assert registry_problems(trained_dir) == []


def test_decoder_trained_on_another_base_model_is_refused(tmp_path, state_path, decoders):
    from safetensors.torch import load_file

    registry = Registry(tmp_path, PROJECT)
    good = registry.write_version(load_file(str(state_path)), BASE)
    registry.activate(good)
    served = decoders(tmp_path)
    assert served.get(PROJECT).version == good
    foreign = registry.write_version(load_file(str(state_path)), {"base_model": {"identity": "vit_b-0123456789ab"}})
    registry.activate(foreign)
    assert served.get(PROJECT).version == good  # refused: the previous version stays served
    assert served.get(PROJECT).version == good  # and not re-read on every request
