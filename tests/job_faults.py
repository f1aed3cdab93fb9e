"""Training-job fault scenarios (tests/test_faults.py, benchmarks/robustness.py): real jobs under the
Dispatcher on a 4-image COCO subset, killed at chosen moments; each returns a plain dict of what was found."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from trainer.jobs import JobStore
from trainer.registry import Registry

from tests.faults import PROJECT, QUIET, REPO, is_dead, wait_dead, database_problems, registry_problems


JOB_CHILD = r"""
import os, resource, signal, sys
from pathlib import Path
repo, model_dir, coco, fsize, crash_at, job_id = sys.argv[1:7]
sys.path.insert(0, repo)
if crash_at != "-":  # SIGKILL at that step of a registry write
    import trainer.registry
    from tests.hooked import crash_at as crash_hook
    trainer.registry.crash_hook = crash_hook(crash_at)
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
        load_coco(coco), Path(model_dir), config, keep_last=5)
"""


def job_command(model_dir: Path, coco: Path, fsize: int | None = None, crash_at: str | None = None) -> list[str]:
    """The dispatcher's command for the job body: file writes past `fsize` bytes fail; SIGKILL at `crash_at`
    (a registry step, trainer.registry.crash_hook)."""
    script = model_dir / "job_child.py"
    script.write_text(JOB_CHILD)
    return [sys.executable, str(script), str(REPO), str(model_dir), str(coco), str(fsize or "-"), crash_at or "-"]


def _files(model_dir: Path) -> set[Path]:
    """Staging dirs and embedding files: a new one means a checkpoint / embedding write has begun."""
    return set((model_dir / "projects" / PROJECT / "versions").glob(".staging-*")) | \
        {p for p in (model_dir / "embeddings").rglob("*") if p.is_file()}


def _new_staging(model_dir: Path, before: set[Path]) -> bool:
    return any(p.name.startswith(".staging-") for p in _files(model_dir) - before)


def _new_embedding(model_dir: Path, before: set[Path]) -> bool:
    return any("embeddings" in p.parts for p in _files(model_dir) - before)


# name -> (seconds after the child starts | predicate(model_dir, files before) firing the kill | the registry step
# whose trainer.registry.crash_hook kills it)
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
    job_id = store.record_event(PROJECT, "START_TRAINING", 0, QUIET, explicit=True)[1]
    events_before = store.count_events()
    env = {**os.environ, "LOG_LEVEL": "WARNING"}
    if "delay" in kill:
        env["JOB_EPOCHS"] = "200"
    dispatcher = Dispatcher(store, model_dir, job_command(model_dir, coco, crash_at=kill.get("crash_at")), env=env)
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
    store.record_event(PROJECT, "START_TRAINING", 0, QUIET, explicit=True)
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
    job_id = store.record_event(PROJECT, "START_TRAINING", 0, QUIET, explicit=True)[1]
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
    if is_dead(child):
        problems.append("the training child died with its dispatcher")
    os.kill(child, signal.SIGKILL)
    wait_dead(child)
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
