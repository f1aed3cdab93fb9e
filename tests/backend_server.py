"""Start the backend exactly as the README does (gunicorn + ml_backend/gunicorn_conf.py) on 127.0.0.1."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import requests

from tests.label_studio import free_port
from tests.services import stop_group

REPO_ROOT = Path(__file__).resolve().parents[1]
GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "ml_backend/gunicorn_conf.py", "ml_backend.wsgi:app"]


def shared_exports() -> Path:
    """The session's export folder (EXPORT_DIR, set by tests/conftest.py) for backends built in the test process:
    gunicorn ones get it through the environment."""
    return Path(os.environ["EXPORT_DIR"])


@contextmanager
def start_backend(env: dict[str, str], log_path: Path, timeout: float = 120) -> Iterator[str]:
    """Run gunicorn with BIND on a free loopback port and the given settings; yields its URL."""
    port = free_port()
    full_env = {**os.environ, "BIND": f"127.0.0.1:{port}", **env}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(GUNICORN, cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"backend exited: {log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"backend not healthy in {timeout}s: {log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop_group(process)
