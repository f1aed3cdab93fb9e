"""The docker-compose deployment as files: compose loading with variable interpolation (what docker-compose
does, without a docker daemon), an .env made from .env.example, the Dockerfile's instructions, and running a
compose service's command on this machine (localize, run_service). Used by tests/test_deploy.py and
tests/compose_stack.py."""
from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import yaml

from tests.label_studio import PASSWORD, TOKEN, USERNAME

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
REDIS_OVERRIDE = DOCKER / "docker-compose.redis.yml"
GPU_OVERRIDE = DOCKER / "docker-compose.gpu.yml"
DOCKERFILE = DOCKER / "Dockerfile"
ENV_EXAMPLE = DOCKER / ".env.example"
VENV_BIN = Path(sys.executable).parent
# The secrets .env.example leaves empty (compose refuses to start without them).
SECRETS = {"LABEL_STUDIO_USERNAME": USERNAME, "LABEL_STUDIO_PASSWORD": PASSWORD,
           "LABEL_STUDIO_USER_TOKEN": TOKEN, "LABEL_STUDIO_API_KEY": TOKEN}
IMAGE_WORKDIR = "/app"
IMAGE_MODEL_DIR = "/data/models"


# ------------------------------------------------------------------------------------------------------------
# A small reader for what compose does: .env files, ${...} interpolation, override merging, Dockerfile ENV
# ------------------------------------------------------------------------------------------------------------

class ComposeError(ValueError):
    pass


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ComposeError(f"{path}: not KEY=VALUE: {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's variable substitution: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}."""
    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name, op, arg = m.group(2) or m.group(5), m.group(3), m.group(4)
        value = variables.get(name)
        if op is None:
            return value or ""
        missing = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return arg if missing else value
        if missing:
            raise ComposeError(f"required variable {name} is missing: {arg}")
        return value
    return _VAR.sub(sub, text)


def _interpolate_tree(node: Any, variables: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, variables) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate_tree(v, variables) for v in node]
    return node


def _merge(base: Any, override: Any) -> Any:
    """Override files: mappings merge key by key (environment, depends_on, ...); anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = _merge(base[key], value) if key in base else value
        return out
    return override


def load_compose(files: list[Path], variables: dict[str, str]) -> dict:
    merged: dict = {}
    for path in files:
        doc = copy.deepcopy(yaml.safe_load(path.read_text()))  # deepcopy: anchors share objects
        merged = _merge(merged, _interpolate_tree(doc, variables))
    for service in merged["services"].values():  # list-form environment -> mapping
        env = service.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
        service["environment"] = {k: "" if v is None else str(v) for k, v in env.items()}
    return merged


def write_env(example: Path, path: Path, values: dict[str, str]) -> Path:
    """docker/.env as a user writes it from .env.example: each KEY= line (commented out or not) set to values'
    value, keys the example lacks appended."""
    lines, done = [], set()
    for line in example.read_text().splitlines():
        key = line.lstrip("# ").split("=", 1)[0] if "=" in line else None
        if key in values and (line.startswith(f"{key}=") or line.startswith(f"# {key}=")):
            line = f"{key}={values[key]}"
            done.add(key)
        lines.append(line)
    lines += [f"{key}={value}" for key, value in values.items() if key not in done]
    path.write_text("\n".join(lines) + "\n")
    return path


def compose_variables(**overrides: str) -> dict[str, str]:
    return {**read_env_file(ENV_EXAMPLE), **SECRETS, **overrides}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.strip().startswith("#") and not current:
            continue
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
        current = ""
    return lines


def dockerfile_env() -> dict[str, str]:
    env = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            env.update(dict(pair.split("=", 1) for pair in rest.split()))
    return env


def _exec_form(arguments: str) -> list[str]:
    return yaml.safe_load(arguments)  # a JSON array is YAML


# ------------------------------------------------------------------------------------------------------------
# Running a service's command outside docker
# ------------------------------------------------------------------------------------------------------------

def localize(env: dict[str, str], addresses: dict[str, str], model_dir: Path) -> dict[str, str]:
    """The container's environment (image ENV + the service's), with compose host names mapped to
    127.0.0.1 ports ("service:port" -> "127.0.0.1:N"), image paths mapped to the checkout / a tmp dir."""
    full = {**dockerfile_env(), **env}
    out = {}
    for key, value in full.items():
        for name, local in addresses.items():
            value = value.replace(f"//{name}/", f"//{local}/").replace(f"//{name}", f"//{local}")
            if value == name:
                value = local
        if value == IMAGE_MODEL_DIR or value.startswith(IMAGE_MODEL_DIR + "/"):
            value = str(model_dir) + value[len(IMAGE_MODEL_DIR):]
        if value == IMAGE_WORKDIR or value.startswith(IMAGE_WORKDIR + "/"):
            value = str(REPO) + value[len(IMAGE_WORKDIR):]
        out[key] = value
    services = {name.split(":")[0] for name in addresses}
    for key, value in out.items():  # nothing may still point into the compose network
        host = urlsplit(value).hostname if "://" in value else None
        assert host not in services, f"{key}={value} still names a compose service"
    base = {"PATH": f"{VENV_BIN}{os.pathsep}/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
            "LANG": "C.UTF-8"}
    return {**base, **out}


def local_command(command: list[str]) -> list[str]:
    """The image's executables are the venv's."""
    first = command[0]
    if first in ("python", "python3"):
        return [sys.executable, *command[1:]]
    if (VENV_BIN / first).exists():
        return [str(VENV_BIN / first), *command[1:]]
    return command


def healthcheck_command(test: list[str]) -> list[str]:
    assert test[0] in ("CMD", "CMD-SHELL"), test
    return local_command(test[1:]) if test[0] == "CMD" else ["sh", "-c", test[1]]


@contextmanager
def run_service(command: list[str], env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    with open(log_path, "wb") as log:
        process = subprocess.Popen(local_command(command), cwd=REPO, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield process
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            if process.poll() is not None:
                break
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(wait)
            except subprocess.TimeoutExpired:
                continue


# ------------------------------------------------------------------------------------------------------------
# Static checks
# ------------------------------------------------------------------------------------------------------------

def docker_compose() -> str:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is not installed (scripts/test.sh installs it: apt-get install docker-compose)"
    return exe


def run_compose_config(files: list[Path], env_file: Path) -> subprocess.CompletedProcess:
    args = [docker_compose(), "--env-file", str(env_file)]
    for path in files:
        args += ["-f", str(path)]
    clean_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([*args, "config"], cwd=REPO, env=clean_env, capture_output=True, text=True, timeout=120)
