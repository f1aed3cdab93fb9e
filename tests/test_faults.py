"""Faults: kill -9 at every step of a registry write and of a training job, disk full during a checkpoint write.

Invariants checked after every fault: each version the registry lists loads (sha256 verified), the active
pointer names nothing or a loadable version, leftovers of a dead writer are ignored and pruned, a killed job
ends `failed` with the signal named (never stuck `running`), the job database is intact and every event
recorded before the fault is still there, and `ActiveDecoders` (what the backend serves) returns the active
decoder or keeps the one it served.

Registry writes are killed in processes forked from a "zygote" that has already imported torch and loaded a
real MaskDecoder state dict, so a kill costs a fork, not a 3 s interpreter start. Each step is also hit
deterministically with `REGISTRY_CRASH_AT=<step>` (trainer/registry.py, test-only), which SIGKILLs the
writer right there. Training jobs run the production job body (`trainer.jobs.run_job`) on a 4-image COCO
subset of dsb2018 under the real `Dispatcher`.

The scenario functions return plain dicts so benchmarks/robustness.py can re-run them for its figures.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.dataset import make_coco
from trainer.jobs import JobStore, TriggerPolicy
from trainer.models import default_checkpoint, file_sha256
from trainer.registry import Registry, RegistryError

BASE = {"base_model": {"identity": "lite_medsam-" + file_sha256(default_checkpoint("lite_medsam"))[:12]}}

REPO = Path(__file__).resolve().parents[1]
SUBSET = {"train": [4, 12], "val": [93], "test": [62]}  # small 256x256 images, 3-4 nuclei each
PROJECT = "faults"
QUIET = TriggerPolicy(min_annotations=10**9, debounce_s=0)  # record events without queueing jobs
REGISTRY_STEPS = ("weights-written", "manifest-written", "before-rename", "version-written",
                  "before-pointer-replace", "activated", "prune-renamed")


# -- shared helpers --------------------------------------------------------------------------------------------
def save_decoder_state(path: Path) -> Path:
    """A real (randomly initialised) LiteMedSAM MaskDecoder state dict as safetensors; no weights needed."""
    from safetensors.torch import save_file

    from trainer.models import build_network

    if not path.exists():
        state = build_network("lite_medsam")[0].mask_decoder.state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def registry_problems(model_dir: Path, project: str = PROJECT) -> list[str]:
    """What is wrong with the registry as readers see it (empty: nothing)."""
    registry = Registry(model_dir, project)
    problems = []
    listed = registry.versions()
    for info in listed:
        try:
            registry.load_decoder(info.version)
        except RegistryError as exc:
            problems.append(f"listed version does not load: {exc}")
    active = registry.active()
    if active is not None and active not in {i.version for i in listed}:
        problems.append(f"active version {active} is not listed")
    if (registry.root / "active.json").exists():
        try:
            json.loads((registry.root / "active.json").read_text())
        except json.JSONDecodeError:
            problems.append("active.json is not JSON")
    return problems


def database_problems(db_path: Path) -> list[str]:
    with sqlite3.connect(db_path) as db:
        result = db.execute("PRAGMA integrity_check").fetchone()[0]
    return [] if result == "ok" else [f"jobs.sqlite integrity_check: {result}"]


def served_problems(decoders, model_dir: Path, project: str = PROJECT) -> list[str]:
    """ActiveDecoders must serve the active version, with exactly the weights stored for it."""
    registry = Registry(model_dir, project)
    active = registry.active()
    served = decoders.get(project)
    if served.version != (active or "base"):
        return [f"served {served.version}, active is {active}"]
    if active is None:
        return []
    stored = registry.load_decoder(active)
    module_state = served.module.state_dict()
    return [f"served weights of {active} differ from the file: {k}" for k in stored
            if not module_state[k].equal(stored[k])][:1]


def stat_signal(status: int) -> str | None:
    return signal.Signals(os.WTERMSIG(status)).name if os.WIFSIGNALED(status) else None


def _dead(pid: int) -> bool:
    """Gone or a zombie whose threads have all exited (a killed leader turns zombie before its other threads
    finish exiting, and they still hold its files, the training lock included)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            if handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                return False
        return len(os.listdir(f"/proc/{pid}/task")) <= 1
    except (FileNotFoundError, ProcessLookupError):
        return True


def _wait_dead(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not _dead(pid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} still alive")
        time.sleep(0.02)


# -- registry writers, forked from a warm zygote ----------------------------------------------------------------
ZYGOTE = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from safetensors.torch import load_file
from trainer.models import default_checkpoint, file_sha256
from trainer.registry import Registry
BASE = {"base_model": {"identity": "lite_medsam-" + file_sha256(default_checkpoint("lite_medsam"))[:12]}}

state = load_file(sys.argv[2])
key = "output_upscaling.0.bias"
print("ready", flush=True)
for line in sys.stdin:
    command = line.split()
    if command[0] == "spawn":  # spawn MODEL_DIR PROJECT CRASH_AT|- FIRST_ITERATION
        pid = os.fork()
        if pid == 0:
            try:
                if command[3] != "-":
                    os.environ["REGISTRY_CRASH_AT"] = command[3]
                registry = Registry(command[1], command[2], keep_last=3)
                i = int(command[4])
                for _ in range(10_000):  # write, activate, prune until killed (bounded should the kill never come)
                    i += 1
                    version = registry.write_version({**state, key: state[key] + i}, {"iteration": i, **BASE})
                    registry.activate(version)
                    registry.prune()
            finally:
                os._exit(3)
        print(pid, flush=True)
    elif command[0] == "wait":  # wait PID [nohang]: its wait status, or "alive"
        flags = os.WNOHANG if len(command) > 2 else 0
        done, status = os.waitpid(int(command[1]), flags)
        print(status if done else "alive", flush=True)
"""


class Zygote:
    """A warm process that forks registry writers (write_version + activate + prune in a loop)."""

    def __init__(self, state_path: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(REPO), str(state_path)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._read(60) == "ready"

    def _read(self, timeout: float) -> str:
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not result:
            raise TimeoutError("zygote did not answer")
        return result[0].strip()

    def _ask(self, line: str, timeout: float = 30) -> str:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self._read(timeout)

    def spawn(self, model_dir: Path, project: str, crash_at: str | None = None, first: int = 0) -> int:
        return int(self._ask(f"spawn {model_dir} {project} {crash_at or '-'} {first}"))

    def wait(self, pid: int, timeout: float = 20) -> int:
        """The writer's wait status; kills it (and fails) if it is still running after timeout."""
        deadline = time.monotonic() + timeout
        while (answer := self._ask(f"wait {pid} nohang")) == "alive":
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                self._ask(f"wait {pid}")
                raise TimeoutError(f"writer {pid} did not die within {timeout}s")
            time.sleep(0.01)
        return int(answer)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(10)


def registry_kill_loop(zygote: Zygote, model_dir: Path, kills: int = 15, budget_s: float = 40,
                       check_served: Callable[[], list[str]] | None = None) -> dict:
    """kill -9 looping writers at spread-out, increasing delays; check the registry after each kill."""
    survived, problems, leftovers, started = 0, [], 0, time.monotonic()
    done = 0
    for k in range(kills):
        if time.monotonic() - started > budget_s:
            break
        first = len(Registry(model_dir, PROJECT).versions()) * 1000 + k  # distinct weights per write
        pid = zygote.spawn(model_dir, PROJECT, None, first)
        time.sleep(0.02 + 0.6 * k / max(1, kills - 1))  # 20 ms .. 620 ms: ~0-8 write/activate/prune cycles
        os.kill(pid, signal.SIGKILL)
        found = problems_after_kill(zygote, pid, model_dir, check_served)
        leftovers += len(list((model_dir / "projects" / PROJECT / "versions").glob(".staging-*")))
        survived += not found
        problems += found
        done += 1
    return {"kills": done, "survived": survived, "problems": problems[:10], "staging_leftovers_seen": leftovers}


def problems_after_kill(zygote: Zygote, pid: int, model_dir: Path, check_served: Callable[[], list[str]] | None,
                        where: str = "") -> list[str]:
    """Wait for a killed writer; what is wrong with the registry (and the served version) afterwards."""
    status = zygote.wait(pid)
    found = registry_problems(model_dir)
    if stat_signal(status) != "SIGKILL":
        found.append(f"writer ended with status {status}, not SIGKILL{where}")
    if check_served is not None:
        found += check_served()
    return found


def registry_step_kills(zygote: Zygote, model_dir: Path,
                        check_served: Callable[[], list[str]] | None = None) -> dict:
    """SIGKILL at each named step of write_version / activate / prune (REGISTRY_CRASH_AT)."""
    results = {}
    for n, step in enumerate(REGISTRY_STEPS):
        registry = Registry(model_dir, PROJECT)
        before = ([i.version for i in registry.versions()], registry.active())
        pid = zygote.spawn(model_dir, PROJECT, step, 100_000 + 1000 * n)
        found = problems_after_kill(zygote, pid, model_dir, check_served, f" at {step}")
        results[step] = {"before": before, "after": ([i.version for i in registry.versions()], registry.active()),
                         "staging_left": len(list(registry.versions_dir.glob(".staging-*"))), "problems": found}
    return results


# -- training jobs under the dispatcher ------------------------------------------------------------------------
JOB_CHILD = r"""
import os, resource, signal, sys
from pathlib import Path
repo, model_dir, coco, fsize, job_id = sys.argv[1:6]
sys.path.insert(0, repo)
if fsize != "-":  # "disk full": writes past fsize bytes fail with EFBIG
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(fsize), resource.RLIM_INFINITY))
from trainer.data import load_coco
from trainer.finetune import FineTuneConfig
from trainer.jobs import JobStore
from trainer.models import load_model
from trainer.runtime import Segmenter
from trainer.jobs import run_job

# margin -1: always promoted; JOB_EPOCHS: a long run for the kills timed by a delay, so the job cannot finish first
epochs = int(os.environ.get("JOB_EPOCHS", "1"))
config = FineTuneConfig(epochs=epochs, patience=epochs, max_objects_per_image=1, margin=-1.0)
run_job(JobStore(Path(model_dir) / "jobs.sqlite"), int(job_id), Segmenter(load_model("lite_medsam")),
        lambda project: load_coco(coco), Path(model_dir), config, keep_last=5)
"""


def job_command(model_dir: Path, coco: Path, fsize: int | None = None) -> list[str]:
    script = model_dir / "job_child.py"
    script.write_text(JOB_CHILD)
    return [sys.executable, str(script), str(REPO), str(model_dir), str(coco), str(fsize or "-")]


def _files(model_dir: Path) -> set[Path]:
    """Staging dirs and embedding files: a new one means a checkpoint / embedding write has begun."""
    return set((model_dir / "projects" / PROJECT / "versions").glob(".staging-*")) | \
        {p for p in (model_dir / "embeddings").rglob("*") if p.is_file()}


def _new_staging(model_dir: Path, before: set[Path]) -> bool:
    return any(p.name.startswith(".staging-") for p in _files(model_dir) - before)


def _new_embedding(model_dir: Path, before: set[Path]) -> bool:
    return any("embeddings" in p.parts for p in _files(model_dir) - before)


# name -> (seconds after the child starts | predicate(model_dir, files before) firing the kill | REGISTRY_CRASH_AT)
JOB_KILLS: dict[str, dict] = {
    "starting (0.5 s)": {"delay": 0.5},
    "loading the model (3 s)": {"delay": 3.0},
    "computing embeddings": {"when": _new_embedding, "cold": True},
    "training (8 s)": {"delay": 8.0},
    "writing the checkpoint": {"when": _new_staging},
    "replacing the active pointer": {"crash_at": "before-pointer-replace"},
    "after promotion, before the job is recorded": {"crash_at": "activated"},
}


def run_killed_job(model_dir: Path, coco: Path, kill: dict, timeout: float = 120) -> dict:
    """Queue a job, run it under a Dispatcher, kill -9 its training process as `kill` says; report invariants."""
    from trainer.jobs import Dispatcher

    store = JobStore(model_dir / "jobs.sqlite")
    registry = Registry(model_dir, PROJECT)
    active_before, versions_before = registry.active(), {i.version for i in registry.versions()}
    files_before = _files(model_dir)
    job_id = store.record_event(PROJECT, "START_TRAINING", 0, QUIET)[1]
    events_before = store.count_events()
    env = {**os.environ, "LOG_LEVEL": "WARNING"}
    if "crash_at" in kill:
        env["REGISTRY_CRASH_AT"] = kill["crash_at"]
    if "delay" in kill:
        env["JOB_EPOCHS"] = "200"
    dispatcher = Dispatcher(store, model_dir, job_command(model_dir, coco), env=env)
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("job", dispatcher.run_once()), daemon=True)
    began = time.monotonic()
    runner.start()
    child, spawn_deadline = None, time.monotonic() + 120
    while child is None and runner.is_alive() and time.monotonic() < spawn_deadline:  # claim_due records our pid;
        # set_pid then the child's
        job = store.job(job_id)
        child = job.pid if job.pid not in (None, os.getpid()) else None
        time.sleep(0.01)
    fired = None
    if child is not None and "crash_at" not in kill:
        deadline = time.monotonic() + timeout
        if "delay" in kill:
            time.sleep(kill["delay"])
        else:
            while runner.is_alive() and not kill["when"](model_dir, files_before) and time.monotonic() < deadline:
                time.sleep(0.002)
        if runner.is_alive():
            store.record_event(PROJECT, "ANNOTATION_CREATED", 1, QUIET)  # recorded while the job runs
            events_before += 1
            fired = round(time.monotonic() - began, 2)
            os.kill(child, signal.SIGKILL)
    runner.join(timeout)
    job = outcome.get("job") or store.job(job_id)
    problems = registry_problems(model_dir) + database_problems(model_dir / "jobs.sqlite")
    active_after = registry.active()
    if job.state != "failed" or "SIGKILL" not in (job.error or ""):
        problems.append(f"job ended {job.state}: {job.error}")
    if store.status(PROJECT)["running"] is not None:
        problems.append("a job is still marked running")
    if active_after != active_before and active_after not in {i.version for i in registry.versions()}:
        problems.append(f"active version changed to {active_after}, which is not listed")
    events_after = store.count_events()
    added = sorted({i.version for i in registry.versions()} - versions_before)
    return {"job": job.id, "state": job.state, "error": job.error, "killed_at_s": fired,
            "seconds": round(time.monotonic() - began, 1), "active_before": active_before,
            "active_after": active_after, "versions_added": added, "events_lost": events_before - events_after,
            "problems": problems}


def run_good_job(model_dir: Path, coco: Path) -> dict:
    from trainer.jobs import Dispatcher

    store = JobStore(model_dir / "jobs.sqlite")
    store.record_event(PROJECT, "START_TRAINING", 0, QUIET)
    env = {**os.environ, "LOG_LEVEL": "WARNING"}
    job = Dispatcher(store, model_dir, job_command(model_dir, coco), env=env).run_once()
    return {"state": job.state, "error": job.error, "result": job.result}


DISPATCHER = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from trainer.jobs import JobStore
from trainer.jobs import Dispatcher
model_dir = Path(sys.argv[2])
Dispatcher(JobStore(model_dir / "jobs.sqlite"), model_dir, json.loads(sys.argv[3])).run_once()
"""


def run_dispatcher_killed(model_dir: Path, coco: Path, after_s: float = 2.0, timeout: float = 60) -> dict:
    """kill -9 the dispatcher process, then its training child: the next dispatcher recovers the job as failed."""
    from trainer.jobs import Dispatcher

    store = JobStore(model_dir / "jobs.sqlite")
    active_before = Registry(model_dir, PROJECT).active()
    job_id = store.record_event(PROJECT, "START_TRAINING", 0, QUIET)[1]
    events_before = store.count_events()
    command = job_command(model_dir, coco)
    parent = subprocess.Popen([sys.executable, "-c", DISPATCHER, str(REPO), str(model_dir), json.dumps(command)],
                              env={**os.environ, "LOG_LEVEL": "WARNING"})
    problems = []
    deadline = time.monotonic() + timeout
    child = None
    while child is None and time.monotonic() < deadline and parent.poll() is None:
        job = store.job(job_id)
        child = job.pid if job.state == "running" and job.pid not in (None, parent.pid) else None
        time.sleep(0.01)
    if child is None:
        parent.kill()
        parent.wait()
        return {"problems": ["the dispatcher never started the training child"], "events_lost": 0}
    time.sleep(after_s)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    # the orphaned child still holds the training lock: no other dispatcher may start (or recover) meanwhile
    if Dispatcher(store, model_dir, command).run_once() is not None:
        problems.append("a second dispatcher ran while the orphaned training child held the lock")
    if store.job(job_id).state != "running":
        problems.append(f"job is {store.job(job_id).state} while its training process still runs")
    if _dead(child):
        problems.append("the training child died with its dispatcher")
    os.kill(child, signal.SIGKILL)
    _wait_dead(child)
    deadline = time.monotonic() + 10
    while store.job(job_id).state == "running" and time.monotonic() < deadline:  # the next dispatcher poll(s)
        assert Dispatcher(store, model_dir, command).run_once() is None  # recovers, then finds nothing due
        time.sleep(0.2)
    job = store.job(job_id)
    if job.state != "failed" or "interrupted" not in (job.error or ""):
        problems.append(f"job ended {job.state}: {job.error}")
    problems += registry_problems(model_dir) + database_problems(model_dir / "jobs.sqlite")
    registry = Registry(model_dir, PROJECT)
    active_after = registry.active()
    if active_after != active_before and active_after not in {i.version for i in registry.versions()}:
        problems.append("active version changed to an unlisted one")
    return {"job": job_id, "state": job.state, "error": job.error, "active_before": active_before,
            "active_after": active_after, "events_lost": events_before - store.count_events(), "problems": problems}


# -- disk full ----------------------------------------------------------------------------------------------------
DISK_FULL = r"""
import json, resource, signal, sys
sys.path.insert(0, sys.argv[1])
from safetensors.torch import load_file
from trainer.jobs import JobStore, TriggerPolicy
from trainer.models import default_checkpoint, file_sha256
from trainer.registry import Registry
BASE = {"base_model": {"identity": "lite_medsam-" + file_sha256(default_checkpoint("lite_medsam"))[:12]}}
model_dir, state_path, limit = sys.argv[2], sys.argv[3], int(sys.argv[4])
state = load_file(state_path)
registry = Registry(model_dir, "faults")
store = JobStore(model_dir + "/jobs.sqlite")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
out = {}
try:
    out["write"] = registry.write_version(state, {"disk": "full", **BASE})
except Exception as exc:
    out["write_error"] = f"{type(exc).__name__}: {exc}"
try:
    out["event"] = store.record_event("faults", "ANNOTATION_CREATED", 1, TriggerPolicy(10**9, 0))[0]
except Exception as exc:
    out["event_error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def run_disk_full(model_dir: Path, state_path: Path, limit: int) -> dict:
    done = subprocess.run([sys.executable, "-c", DISK_FULL, str(REPO), str(model_dir), str(state_path), str(limit)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ================================================ tests =========================================================
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
    store.record_event(PROJECT, "START_TRAINING", 0, QUIET)
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
