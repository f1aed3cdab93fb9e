"""Helpers shared by the benchmark scripts: machine description and timing."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch


def git_commit() -> str:
    """The commit measured, with "+dirty" when the work tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=30).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> dict:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d"), "loadavg": [round(x, 2) for x in os.getloadavg()],
            "git_commit": git_commit()}


def timed(fn: Callable[[], object], repeat: int, warmup: int = 1) -> dict:
    """Median / min / max seconds of fn over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples), "n": repeat}


def round_robin(fns: dict[str, Callable[[], object]], repeat: int, warmup: int = 1) -> dict[str, dict]:
    """Time several functions interleaved (a, b, c, a, b, c, ...) so that machine noise hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - started)
    return {name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "n": repeat}
            for name, v in samples.items()}
