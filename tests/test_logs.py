"""Logs that explain (issue 27, item 6): JSON lines whose reserved keys no field overwrites, every 4xx with its
reason, a start line per worker with no secrets, warnings and thread crashes as JSON, training epochs as fields,
the command line in the same format (or text). gunicorn's own lines: tests/test_startup.py reads a whole
gunicorn log and finds every line JSON."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ml_backend.logs import JsonFormatter, TextFormatter
from ml_backend.settings import Settings
from tests.dataset import make_coco

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cret-api-key-0123456789"
CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="box" toName="image"><Label value="nucleus"/></RectangleLabels>
<BrushLabels name="mask" toName="image"><Label value="nucleus"/></BrushLabels></View>"""


def record(message: str, **extra) -> logging.LogRecord:
    logger = logging.getLogger("test.logs")
    return logger.makeRecord(logger.name, logging.INFO, __file__, 1, message, (), None, extra=extra)


def test_reserved_keys_are_never_overwritten() -> None:
    line = json.loads(JsonFormatter().format(record("request", event=7, time="x", level="y", logger="z", pid=0,
                                                    status=200)))
    assert (line["event"], line["level"], line["logger"]) == ("request", "INFO", "test.logs")
    assert line["time"].endswith("Z") and line["pid"] == os.getpid()
    assert (line["event_"], line["time_"], line["level_"], line["logger_"], line["pid_"]) == (7, "x", "y", "z", 0)
    assert line["status"] == 200
    text = TextFormatter().format(record("request", event=7, status=200))
    assert " INFO test.logs: request " in text and "event_=7" in text and "status=200" in text


@pytest.fixture(scope="module")
def app(segmenter, tmp_path_factory):
    from ml_backend.app import create_app
    from ml_backend.backend import SamBackend

    settings = Settings(model_dir=tmp_path_factory.mktemp("models"), label_studio_api_key=SECRET, prewarm=False,
                        basic_auth_user="annotator", basic_auth_pass=SECRET, training_runner="off")
    handler, logger = Capture(), logging.getLogger("ml_backend")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        client = create_app(settings, SamBackend(settings, segmenter)).test_client()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    client.environ_base["HTTP_AUTHORIZATION"] = "Basic " + __import__("base64").b64encode(
        f"annotator:{SECRET}".encode()).decode()
    return client, handler.lines


class Capture(logging.Handler):
    """The formatted JSON lines of a logger, as they would reach stderr."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def http_lines():
    handler = Capture()
    logger = logging.getLogger("ml_backend.http")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(old)


def test_start_line_names_model_device_version_settings_and_no_secret(app) -> None:
    _, lines = app
    [ready] = [json.loads(line) for line in lines if json.loads(line)["event"] == "ready"]
    assert ready["model"].startswith("lite_medsam-") and ready["device"] == "cpu"
    assert ready["model_version"].endswith("@base") and ready["runner"] == "off"
    assert ready["settings"]["predict_deadline_s"] == 75.0 and ready["settings"]["basic_auth_user"] == "annotator"
    assert ready["settings"]["label_studio_api_key"] is True and ready["settings"]["basic_auth_pass"] is True
    assert SECRET not in "".join(lines)


def test_webhook_line_keeps_its_event_name(app, http_lines) -> None:
    client, _ = app
    body = {"action": "ANNOTATION_CREATED", "project": {"id": 3},
            "annotation": {"id": 1, "result": [], "was_cancelled": False}, "task": {"id": 1}}
    assert client.post("/webhook", json=body).status_code == 200
    [line] = [json.loads(x) for x in http_lines]
    assert line["event"] == "request" and isinstance(line["event_id"], int) and line["action"] == "ANNOTATION_CREATED"


@pytest.mark.parametrize("call, status, reason", [
    (lambda c: c.post("/predict", json={"tasks": "x", "label_config": CONFIG}), 400, "tasks must be a list"),
    (lambda c: c.post("/webhook", data="not json", content_type="application/json"), 400, "JSON object"),
    (lambda c: c.get("/train/status"), 400, "project"),
    (lambda c: c.get("/no/such/route"), 404, "not found"),
    (lambda c: c.get("/versions", headers={"Authorization": "Basic d3Jvbmc6d3Jvbmc="}), 401, ""),
])
def test_every_4xx_is_logged_with_its_reason(app, http_lines, call, status: int, reason: str) -> None:
    client, _ = app
    response = call(client)
    assert response.status_code == status
    [line] = [json.loads(x) for x in http_lines]
    assert line["status"] == status and line["level"] == "WARNING"
    assert line["error"] == response.get_json()["error"] and reason.lower() in line["error"].lower()
    assert "d3Jvbmc6d3Jvbmc=" not in json.dumps(line)


def run_python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "LOG_"))}
    command = [sys.executable, *(["-c", code] if code else []), *args]
    return subprocess.run(command, cwd=REPO, env={**base, **(env or {})}, capture_output=True, text=True, timeout=300)


def test_warnings_and_thread_crashes_are_json_lines() -> None:
    code = ("import threading, warnings; from ml_backend.logs import configure; configure(); "
            "warnings.warn('an old API'); "
            "t = threading.Thread(target=lambda: 1 / 0, name='boom'); t.start(); t.join(); "
            "import logging; logging.getLogger('urllib3.connectionpool').info('GET https://x/?signature=abc')")
    done = run_python(code)
    lines = done.stderr.strip().splitlines()
    entries = [json.loads(line) for line in lines]  # every line: JSON
    assert any(e["logger"] == "py.warnings" and "an old API" in e["event"] for e in entries)
    [crash] = [e for e in entries if e["event"] == "uncaught exception in a thread"]
    assert crash["thread_name"] == "boom" and "ZeroDivisionError" in crash["exception"]
    assert "signature" not in done.stderr  # HTTP libraries' INFO lines are off


def test_command_line_logs_json_by_default_and_text_on_request(tmp_path: Path) -> None:
    """`worker --job` on a job that does not exist logs one error line (after loading the model)."""
    args = ["-m", "ml_backend", "worker", "--job", "999"]
    as_json = run_python("", *args, env={"MODEL_DIR": str(tmp_path)})
    assert as_json.returncode == 1
    entries = [json.loads(line) for line in as_json.stderr.strip().splitlines()]
    assert any(e["event"] == "job failed" and e["job"] == 999 and e["level"] == "ERROR" for e in entries)
    as_text = run_python("", "-m", "ml_backend", "--log-format", "text", *args[2:], env={"MODEL_DIR": str(tmp_path)})
    [line] = [x for x in as_text.stderr.splitlines() if "job failed" in x]
    assert " ERROR ml_backend.training: job failed " in line and "job=999" in line
    assert not line.lstrip().startswith("{")


def test_training_epochs_are_structured(segmenter, tmp_path: Path, caplog) -> None:
    from trainer.data import load_coco
    from trainer.finetune import FineTuneConfig, TrainingEmbeddings, fine_tune

    data = load_coco(make_coco(tmp_path / "coco", {"train": [4], "val": [12, 25]}))
    with caplog.at_level(logging.INFO, logger="trainer.finetune"):
        fine_tune(segmenter, data, TrainingEmbeddings(segmenter, None),
                  FineTuneConfig(epochs=1, max_objects_per_image=1), progress=False)
    epochs = [r for r in caplog.records if r.getMessage() == "epoch"]
    assert [r.epoch for r in epochs] == [0, 1] and all(r.epochs == 1 for r in epochs)
    assert all(isinstance(r.train_loss, float) and isinstance(r.seconds, float) for r in epochs[1:])
    assert all(r.val_miou is None or 0 <= r.val_miou <= 1 for r in epochs)


def test_a_worker_that_cannot_start_says_why_in_json(tmp_path: Path) -> None:
    """A bad setting in a worker (here an unknown SAM_MODEL): one JSON line with the reason, then gunicorn stops
    ("Worker failed to boot", exit code 3) instead of restarting workers forever; no bare printed line."""
    from tests.backend_server import GUNICORN
    from tests.label_studio import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "LOG_", "BIND", "WORKERS"))}
    env.update(SAM_MODEL="no_such_model", BIND=f"127.0.0.1:{free_port()}", MODEL_DIR=str(tmp_path / "models"))
    done = subprocess.run(GUNICORN, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3
    entries = [json.loads(line) for line in (done.stdout + done.stderr).strip().splitlines()]  # every line: JSON
    [failed] = [e for e in entries if e["event"] == "worker failed to start"]
    assert "no_such_model" in failed["error"] and failed["level"] == "ERROR"
    assert any("Worker failed to boot" in e["event"] for e in entries)
