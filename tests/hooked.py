"""Start a module with test hooks set in the product code, so that the product never reads a test-only
environment variable:

    python -m tests.hooked '{"training_job_command": [...]}' -m rq.cli worker training --url ...
    python -m tests.hooked '{"registry_crash_at": "activated"}' -m ml_backend worker --job 7

Hooks: `training_job_command` (ml_backend.training.job_command: what a job's child process runs; an RQ worker's
work horses are forked, so they have it too), `registry_crash_at` (trainer.registry.crash_hook: SIGKILL the
process at that step of a registry write). Run from the repository root (`-m` puts it on the path)."""
from __future__ import annotations

import json
import os
import runpy
import signal
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


def crash_at(step: str) -> Callable[[str], None]:
    """A trainer.registry.crash_hook that kills this process (SIGKILL) when the write reaches `step`."""
    def hook(reached: str) -> None:
        if reached == step:
            os.kill(os.getpid(), signal.SIGKILL)
    return hook


def install(hooks: dict) -> None:
    unknown = set(hooks) - {"training_job_command", "registry_crash_at"}
    if unknown:
        raise SystemExit(f"tests.hooked: unknown hooks {sorted(unknown)}")
    if hooks.get("registry_crash_at"):
        from trainer import registry
        registry.crash_hook = crash_at(hooks["registry_crash_at"])
    if hooks.get("training_job_command"):
        from ml_backend import training
        training.job_command = [str(part) for part in hooks["training_job_command"]]


def command(hooks: dict, module: str, *args: str) -> list[str]:
    """The command line that runs `python -m module args...` with `hooks` installed (cwd: the repository)."""
    return [sys.executable, "-m", "tests.hooked", json.dumps(hooks), "-m", module, *args]


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "-m":
        raise SystemExit("usage: python -m tests.hooked '<json hooks>' -m MODULE [ARGS...]")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    install(json.loads(argv[0]))
    sys.argv = [argv[2], *argv[3:]]
    runpy.run_module(argv[2], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
