"""The docker-compose deployment on a real Docker engine, as a user runs it: a copy of the checkout (what a clone
holds), the images (the public ones where a registry answers, else built locally by
docker/build-without-registry.sh), docker-compose commands with an .env made from docker/.env.example, the
containers' health, and what a project leaves behind. Used by tests/test_compose_stack.py."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.compose import REPO, docker_compose
from tests.services import log_tail

PROJECT = "sam-compose-test"                  # fixed: a crashed run's leftovers are removed by the next run
SERVICES = ("label-studio", "sam-backend", "sam-worker")
PUBLIC_BASE, PUBLIC_LABEL_STUDIO = "python:3.11-slim", "heartexlabs/label-studio:1.23.2"
LOCAL_BASE, LOCAL_LABEL_STUDIO = "local/python:3.11-bookworm", "local/label-studio:1.23.2"
TORCH_CPU_INDEX, PYPI_INDEX = "https://download.pytorch.org/whl/cpu", "https://pypi.org/simple"
BUILD_TIMEOUT_S = 1800                        # a cold build on 2 cores: debootstrap + Label Studio + torch


def docker() -> str:
    exe = shutil.which("docker")
    assert exe, "the docker CLI is not installed (scripts/test.sh installs docker.io with apt)"
    return exe


def engine_problem() -> str | None:
    """None when a Docker engine answers, else why not (scripts/test.sh starts dockerd before the suite)."""
    try:
        info = subprocess.run([docker(), "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                              timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if info.returncode != 0 or not info.stdout.strip():
        return f"no Docker engine answers ({info.stderr.strip()[:300]}); scripts/test.sh starts dockerd"
    return None


def run_logged(args: list[str], log: Path, timeout: float, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command with its output appended to `log`; fail with the log's tail on a non-zero exit."""
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(args)}\n".encode())
        out.flush()
        result = subprocess.run(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} exited with {result.returncode}:\n{log_tail(log, 6000)}"
    return result


def checkout_copy(dest: Path) -> Path:
    """The working tree's files that a commit would hold (tracked and not ignored), copied to `dest`: the build
    sees what a clone of these changes holds, and the checkout itself is never written."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, timeout=60, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # listed but deleted in the working tree: not part of the change
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def _image_present(image: str, log: Path) -> bool:
    if subprocess.run([docker(), "image", "inspect", image], capture_output=True, timeout=60).returncode == 0:
        return True
    with open(log, "ab") as out:  # a registry that cannot be reached answers within seconds (no DNS, refused)
        try:
            return subprocess.run([docker(), "pull", image], stdout=out, stderr=subprocess.STDOUT,
                                  timeout=900).returncode == 0
        except subprocess.TimeoutExpired:
            return False


def index_reachable(url: str) -> bool:
    """Whether a package index answers (from a child process: this test process only talks to loopback)."""
    probe = "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=15)"
    try:
        return subprocess.run([sys.executable, "-c", probe, url.rstrip("/") + "/torch/"], capture_output=True,
                              timeout=60).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@dataclass(frozen=True)
class ImageSources:
    base_image: str
    label_studio_image: str
    torch_index_url: str


def prepare_images(checkout: Path, log: Path) -> ImageSources:
    """The public images where a registry answers; else the local stand-ins docker/build-without-registry.sh
    builds (its debootstrap base is kept between runs, its other layers are cached). Either way the host pip's
    CA bundle lands in docker/certs/ so pip inside the builds trusts it. PyTorch's CPU index where it answers,
    else PyPI (CUDA wheels: a larger image)."""
    script = str(checkout / "docker" / "build-without-registry.sh")
    if _image_present(PUBLIC_BASE, log) and _image_present(PUBLIC_LABEL_STUDIO, log):
        run_logged([script, "--certs"], log, 60, cwd=checkout)
        base, label_studio = PUBLIC_BASE, PUBLIC_LABEL_STUDIO
    else:
        run_logged([script], log, BUILD_TIMEOUT_S, cwd=checkout)
        base, label_studio = LOCAL_BASE, LOCAL_LABEL_STUDIO
    torch_index = TORCH_CPU_INDEX if index_reachable(TORCH_CPU_INDEX) else PYPI_INDEX
    return ImageSources(base, label_studio, torch_index)


class ComposeProject:
    """docker-compose (v1, as Debian ships it) on the copy's docker/docker-compose.yml with an .env file."""

    def __init__(self, checkout: Path, env_file: Path, log: Path) -> None:
        self.checkout, self.env_file, self.log = checkout, env_file, log
        self.compose_file = checkout / "docker" / "docker-compose.yml"

    def args(self, *args: str) -> list[str]:
        return [docker_compose(), "--env-file", str(self.env_file), "-f", str(self.compose_file), *args]

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return run_logged(self.args(*args), self.log, timeout, cwd=self.checkout)

    def output(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """A command whose output the test reads (not checked: the caller asserts)."""
        return subprocess.run(self.args(*args), cwd=self.checkout, capture_output=True, text=True, timeout=timeout)

    def timed(self, *args: str, timeout: float = 300) -> float:
        started = time.monotonic()
        self.run(*args, timeout=timeout)
        return time.monotonic() - started

    def container(self, service: str) -> str:
        ids = self.output("ps", "-q", service, timeout=60).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def health(self, service: str) -> str:
        state = subprocess.run([docker(), "inspect", "--format", "{{json .State}}", self.container(service)],
                               capture_output=True, text=True, timeout=60)
        if state.returncode != 0:
            return "absent"
        state = json.loads(state.stdout)
        return (state.get("Health") or {}).get("Status") or state.get("Status", "unknown")

    def wait_healthy(self, services: tuple[str, ...], timeout: float) -> float:
        """Seconds until every service's container is healthy; fails on `timeout` or an unhealthy one."""
        started = time.monotonic()
        while True:
            states = {service: self.health(service) for service in services}
            if all(state == "healthy" for state in states.values()):
                return time.monotonic() - started
            failed = {"unhealthy", "exited"} & set(states.values())
            if failed or time.monotonic() - started > timeout:
                raise AssertionError(f"{states} after {time.monotonic() - started:.0f} s (limit {timeout:.0f} s)\n"
                                     f"{self.logs()[-12000:]}")
            time.sleep(1)

    def exec(self, service: str, *command: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.output("exec", "-T", service, *command, timeout=timeout)

    def logs(self, service: str = "", tail: int = 80) -> str:
        """The last `tail` lines of each service's log (of one service), each line prefixed `service_1  | `."""
        result = self.output("logs", "--no-color", "--tail", str(tail), *([service] if service else []), timeout=120)
        return result.stdout + result.stderr

    def exit_codes(self, since: float) -> dict[str, int]:
        """Each of the project's containers that stopped since `since` (epoch seconds): its last exit code (137:
        killed after the stop timeout, SIGTERM unheeded; 143: ended by SIGTERM; 0: exited by itself)."""
        events = subprocess.run([docker(), "events", "--since", f"{since:.3f}", "--until", f"{time.time():.3f}",
                                 "--filter", "event=die", "--filter", f"label=com.docker.compose.project={PROJECT}",
                                 "--format", "{{json .Actor.Attributes}}"], capture_output=True, text=True, timeout=60)
        assert events.returncode == 0, events.stderr
        attributes = [json.loads(line) for line in events.stdout.splitlines() if line.strip()]
        return {a["com.docker.compose.service"]: int(a["exitCode"]) for a in attributes}

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, networks and volumes of the project that still exist."""
        label = f"label=com.docker.compose.project={PROJECT}"
        found = {}
        for kind, args in (("containers", ["ps", "-a", "-q"]), ("networks", ["network", "ls", "-q"]),
                           ("volumes", ["volume", "ls", "-q"])):
            found[kind] = subprocess.run([docker(), *args, "--filter", label], capture_output=True, text=True,
                                         timeout=60).stdout.split()
        return found


def tagged_image_id(image: str) -> str | None:
    found = subprocess.run([docker(), "image", "inspect", "--format", "{{.Id}}", image], capture_output=True,
                           text=True, timeout=60)
    return found.stdout.strip() if found.returncode == 0 else None


def remove_replaced(old_id: str | None, image: str) -> None:
    """After a rebuild moved `image`'s tag, delete the image it replaced (layers the new one shares stay): each
    change of the requirements would otherwise leave gigabytes of untagged layers behind."""
    if old_id and old_id != tagged_image_id(image):
        subprocess.run([docker(), "image", "rm", old_id], capture_output=True, timeout=300)


def image_size_gb(image: str) -> float:
    size = subprocess.run([docker(), "image", "inspect", "--format", "{{.Size}}", image], capture_output=True,
                          text=True, timeout=60)
    assert size.returncode == 0, size.stderr
    return round(int(size.stdout.strip()) / 1e9, 2)
