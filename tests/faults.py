"""Fault-injection helpers shared by tests/test_faults.py and benchmarks/robustness.py: a zygote that writes
registry versions and can be killed at each step, disk-full runs, and the checks of what a killed writer left
behind. Training-job scenarios are in tests/job_faults.py."""
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

from trainer.jobs import TriggerPolicy
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


def is_dead(pid: int) -> bool:
    """Gone or a zombie whose threads have all exited (a killed leader turns zombie before its other threads
    finish exiting, and they still hold its files, the training lock included)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            if handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                return False
        return len(os.listdir(f"/proc/{pid}/task")) <= 1
    except (FileNotFoundError, ProcessLookupError):
        return True


def wait_dead(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not is_dead(pid):
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
                if command[3] != "-":  # SIGKILL at that step (trainer.registry.crash_hook)
                    import trainer.registry
                    from tests.hooked import crash_at
                    trainer.registry.crash_hook = crash_at(command[3])
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
    """SIGKILL at each named step of write_version / activate / prune (trainer.registry.crash_hook)."""
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
