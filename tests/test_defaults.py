"""Defaults and messages a new team meets in its first week (issue 27, item 5), against a real Label Studio 1.23.2
(legacy tokens on, as the suite's server runs) and the real model.

- `connect` says LABEL_STUDIO_URL is missing without loading torch (trainer/ imports lazily).
- `train` / `eval --data ls://<id>` work with the connection Label Studio's /setup left under MODEL_DIR, and
  `eval`'s split defaults to val on a project (train/val only).
- A wrong key is explained by what Label Studio answered (never "turn legacy tokens on" while they are on).
- A wrong key in the environment is found at start (a log line, not a crash) and does not stop a project whose
  /setup token works.
- Where gunicorn listens by default (BIND, PORT, auth).
"""
from __future__ import annotations

import base64
import json
import logging
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ml_backend.credentials import check_and_log, check_key, configured_key_rejected, project_credentials
from ml_backend.label_studio import ConnectError, LabelStudioClient, save_connection
from ml_backend.settings import Settings
from tests import dataset
from tests.label_studio import gt_brush_results, rect_result

REPO = Path(__file__).resolve().parents[1]
WRONG_LEGACY = "0123456789abcdef0123456789abcdef01234567"
IMAGES = [4, 12, 25]  # small 256x256 images, 3-4 nuclei each


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m ml_backend ...` with no Label Studio settings inherited."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "LOG_"))}
    return subprocess.run([sys.executable, "-m", "ml_backend", *args], cwd=REPO, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_connect_names_the_missing_url_before_loading_torch() -> None:
    code = ("import json, sys, time; began = time.monotonic(); from ml_backend.cli import main; "
            "rc = main(['connect', '--project', '1']); "
            "print(json.dumps({'rc': rc, 'loaded': [m for m in ('torch', 'scipy', 'cv2') if m in sys.modules]}))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO_")}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome == {"rc": 2, "loaded": []}, done.stderr
    assert "LABEL_STUDIO_URL" in done.stderr and "Traceback" not in done.stderr


def test_trainer_public_names_still_resolve() -> None:
    import trainer

    for name in trainer.__all__:
        assert getattr(trainer, name) is not None
    from trainer import JobStore, Segmenter  # noqa: F401  (the `from trainer import X` form too)
    with pytest.raises(AttributeError):
        trainer.no_such_name  # noqa: B018


@pytest.fixture(scope="module")
def annotated_project(label_studio) -> int:
    """A project of 3 tasks with their nuclei as brush annotations (the suite's box/mask config)."""
    from tests.label_studio import SAM_LABEL_CONFIG

    project = label_studio.create_project("issue 27 defaults", SAM_LABEL_CONFIG)
    for task_id, image_id in zip(label_studio.upload_images(project, [dataset.image_path(i) for i in IMAGES]), IMAGES):
        label_studio.create_annotation(task_id, gt_brush_results(image_id))
    return project


def test_ls_data_uses_the_setup_connection_and_eval_defaults_to_val(label_studio, annotated_project: int,
                                                                    tmp_path: Path) -> None:
    project = str(annotated_project)
    model_dir = tmp_path / "models"
    done = cli("train", "--data", f"ls://{project}", "--project", project, "--model-dir", str(model_dir))
    assert done.returncode == 2 and "LABEL_STUDIO_URL" in done.stderr and "/setup" in done.stderr, done.stderr
    # what the backend keeps when Label Studio connects the project (its /setup call)
    save_connection(Settings(model_dir=model_dir), project, label_studio.url, label_studio.token)
    trained = cli("train", "--data", f"ls://{project}", "--project", project, "--model-dir", str(model_dir),
                  "--epochs", "1", "--max-objects-per-image", "1", "--json")
    assert trained.returncode == 0, trained.stderr[-3000:]
    report = json.loads(trained.stdout.strip().splitlines()[-1])
    assert report["data"]["images"] == len(IMAGES) and report["version"] == "v0001"
    evaluated = cli("eval", "--data", f"ls://{project}", "--project", project, "--model-dir", str(model_dir),
                    "--version", "v0001", "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["split"] == "val" and result["n_objects"] > 0 and result["model_version"].endswith("@v0001")


def fake_jwt(claims: dict) -> str:
    """A token shaped like a personal access token (a JWT) that no Label Studio signed."""
    part = lambda data: base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")  # noqa: E731
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


def test_a_wrong_key_is_explained_by_what_label_studio_said(label_studio) -> None:
    """The suite's Label Studio has legacy tokens on: an unknown legacy token is "not known", not "turn legacy
    tokens on"; a JWT that is not valid there gets the personal access token's explanation."""
    with pytest.raises(ConnectError) as legacy:
        LabelStudioClient(label_studio.url, WRONG_LEGACY).whoami()
    assert "does not know this token" in str(legacy.value)
    assert "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN" not in str(legacy.value) and WRONG_LEGACY not in str(legacy.value)
    for claims in ({"token_type": "refresh", "exp": int(time.time()) + 3600},  # refused by Label Studio
                   {"token_type": "refresh"}):  # refused by label-studio-sdk before any call (no expiry)
        with pytest.raises(ConnectError) as pat:
            LabelStudioClient(label_studio.url, fake_jwt(claims)).whoami()
        assert "personal access token" in str(pat.value)
        assert "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN" not in str(pat.value)
    done = cli("connect", "--project", "1", env={"LABEL_STUDIO_URL": label_studio.url,
                                                "LABEL_STUDIO_API_KEY": WRONG_LEGACY})
    assert done.returncode == 2 and "does not know this token" in done.stderr and WRONG_LEGACY not in done.stderr


def test_a_wrong_key_in_the_environment_falls_back_to_the_setup_token(label_studio, annotated_project: int,
                                                                       segmenter, tmp_path: Path, caplog) -> None:
    from ml_backend.app import create_app
    from ml_backend.backend import SamBackend

    project = str(annotated_project)
    good = Settings(label_studio_url=label_studio.url, label_studio_api_key=label_studio.token,
                    model_dir=tmp_path / "good")
    assert check_key(label_studio.url, label_studio.token).state == "ok"
    assert check_and_log(good, attempts=1).state == "ok" and not configured_key_rejected(good)
    settings = Settings(label_studio_url=label_studio.url, label_studio_api_key=WRONG_LEGACY, model_dir=tmp_path / "m",
                        prewarm=False)
    app = create_app(settings, SamBackend(settings, segmenter)).test_client()
    # Label Studio connects the project: /setup sends its hostname and the project creator's token
    assert app.post("/setup", json={"project": f"{project}.1700000000", "hostname": label_studio.url,
                                    "access_token": label_studio.token}).status_code == 200
    with caplog.at_level(logging.INFO, logger="ml_backend.label_studio"):
        check = check_and_log(settings, attempts=1)  # what each worker runs in the background at start
    assert check.state == "rejected" and "does not know this token" in check.reason
    [line] = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert line.levelno == logging.ERROR and WRONG_LEGACY not in line.getMessage() + str(line.__dict__)
    assert configured_key_rejected(settings)
    assert project_credentials(settings, project) == (label_studio.url, label_studio.token)
    assert project_credentials(settings, "999") == (label_studio.url, WRONG_LEGACY)  # no /setup token: nothing better
    task = label_studio.tasks(annotated_project)[0]
    image_id = IMAGES[0]
    info = dataset.image_info(image_id)
    boxes = [rect_result(*a["bbox"], info["width"], info["height"], "nucleus") for a in dataset.annotations(image_id)]
    from tests.label_studio import SAM_LABEL_CONFIG

    answer = app.post("/predict", json={"project": f"{project}.1700000000", "label_config": SAM_LABEL_CONFIG,
                                        "tasks": [{"id": task["id"], "data": task["data"],
                                                   "annotations": [{"id": 1, "result": boxes}]}]}).get_json()
    [result] = answer["results"]
    assert "error" not in result and len(result["result"]) >= len(boxes), result


@pytest.mark.parametrize("env, bind", [
    ({}, "127.0.0.1:9090"),
    ({"PORT": "9191"}, "127.0.0.1:9191"),
    ({"BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p"}, "0.0.0.0:9090"),
    ({"AUTH_TOKEN": "t", "PORT": "9292"}, "0.0.0.0:9292"),
    ({"BASIC_AUTH_USER": "u"}, "127.0.0.1:9090"),  # a user without a password asks for nothing
    ({"BIND": "0.0.0.0:9090"}, "0.0.0.0:9090"),
    ({"BIND": "127.0.0.1:8000", "AUTH_TOKEN": "t"}, "127.0.0.1:8000"),
])
def test_where_gunicorn_listens_by_default(env: dict[str, str], bind: str, monkeypatch) -> None:
    for name in ("BIND", "PORT", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "AUTH_TOKEN", "WORKERS", "TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = runpy.run_path(str(REPO / "ml_backend" / "gunicorn_conf.py"))  # what `gunicorn -c` reads
    assert config["bind"] == bind
    assert config["control_socket_disable"] is True and config["logconfig_dict"]["root"]["handlers"] == ["stderr"]


def test_start_script_documents_bind_and_port() -> None:
    text = (REPO / "scripts" / "start.sh").read_text()
    assert "BIND" in text and "PORT" in text and "127.0.0.1" in text
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "start.sh")]).returncode == 0
