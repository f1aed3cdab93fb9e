"""Helpers for tests and benchmarks that run real processes: bounded polling and a throwaway redis-server."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from tests.label_studio import free_port

T = TypeVar("T")


def log_tail(path: Path | None, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path and path.exists() else "<no log>"


def wait_for(predicate: Callable[[], T], timeout: float, what: str, process: subprocess.Popen | None = None,
             log_path: Path | None = None, interval: float = 0.5) -> T:
    """Poll until predicate() is truthy (returns its value); fail when `timeout` passes or `process` exits,
    with the tail of `log_path`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {process.returncode}:\n{log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s:\n{log_tail(log_path)}")
        time.sleep(interval)


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A redis-server on a free 127.0.0.1 port, no persistence; yields its URL."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (scripts/test.sh installs it: apt-get install redis-server)"
    port = free_port()
    log_path = folder / "redis.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", str(folder)], stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        from redis import Redis

        def up() -> bool:
            try:
                return bool(Redis.from_url(url, socket_timeout=2).ping())
            except Exception:
                return False

        wait_for(up, 20, "redis-server", process, log_path, interval=0.2)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def stop_group(process: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM to a process started with start_new_session (and so to its children), SIGKILL after `grace_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


@contextlib.contextmanager
def rq_worker(redis_url: str, env: dict[str, str], log_path: Path, cwd: Path) -> Iterator[subprocess.Popen]:
    """A real `rq worker training --with-scheduler` (the README's command) in its own process group, stopped with
    its job's child when the block ends."""
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "rq.cli", "worker", "training", "--url", redis_url,
                                   "--with-scheduler"], cwd=cwd, env=env, start_new_session=True, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        yield worker
    finally:
        stop_group(worker)


HOLD = """
import sys, time
from pathlib import Path
from ml_backend.host_calls import HostLiveCalls
with HostLiveCalls.for_model_dir(Path(sys.argv[1])).mark():
    print("live", flush=True)
    while not Path(sys.argv[2]).exists():
        time.sleep(0.02)
"""


def hold_a_live_call(model_dir: Path, release: Path) -> subprocess.Popen:
    """Another backend process of the host in the middle of a live call (ml_backend/host_calls.py), until `release`
    exists."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(model_dir), str(release)],
                               cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "live"
    return process
