"""`connect` against a real Label Studio 1.23.2 and the backend under gunicorn: a project connected in the UI and
again by command, under every spelling of the backend's URL, keeps one ML backend and one webhook; duplicates
left by earlier releases (and the webhook Label Studio leaves behind when an ML backend is deleted) are removed;
an annotation delivered by two webhooks counts once; a webhook Label Studio refuses is an error with its reason
and leaves nothing half made. And tasks without boxes: no prediction stored, so boxes drawn later get masks on
the next Retrieve predictions, and the pre-label job deletes an empty prediction an earlier release stored."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from urllib.parse import urlsplit

import pytest
import requests

from ml_backend import cli
from tests import dataset
from tests.backend_server import REPO_ROOT, start_backend
from tests.label_studio import rect_result
from tests.services import wait_for

IMAGES = dataset.splits()["test"][:3]


@pytest.fixture(scope="module")
def backend(label_studio, tmp_path_factory):
    root = tmp_path_factory.mktemp("connect-backend")
    env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
           "MODEL_DIR": str(root / "models"), "WORKERS": "1", "THREADS": "4", "TRAINING_RUNNER": "off",
           "PREWARM": "false"}
    with start_backend(env, root / "gunicorn.log") as url:
        yield url, root / "gunicorn.log", env


@pytest.fixture
def connect(label_studio, backend, monkeypatch, capsys):
    """`python -m ml_backend connect --project P --url URL [extra...]` (in this process: it saves the
    interpreter's start per call) -> (exit code, stdout, stderr)."""
    _, _, env = backend
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def run(project: int, url: str, *extra: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(["connect", "--project", str(project), "--url", url, *extra])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def ml_backends(label_studio, project: int) -> list[dict]:
    return label_studio.get("/api/ml", params={"project": project})


def ml_webhooks(label_studio, project: int) -> list[dict]:
    return [h for h in label_studio.get("/api/webhooks", params={"project": project})
            if h["url"].rstrip("/").endswith("/webhook")]


def local_host_name() -> str | None:
    """This machine's name when it has no dot (Label Studio takes it for an ML backend, refuses it for a
    webhook) and resolves to this machine."""
    name = socket.gethostname()
    try:
        local = socket.gethostbyname(name).startswith("127.")
    except OSError:
        return None
    return name if "." not in name and local else None


def box_result(image_id: int) -> list[dict]:
    info = dataset.image_info(image_id)
    return [rect_result(*a["bbox"], info["width"], info["height"], "nucleus") for a in dataset.annotations(image_id)]


def test_connect_in_any_spelling_keeps_one_ml_backend_and_one_webhook(label_studio, ls_project, backend, connect):
    url, log_path, _ = backend
    port = urlsplit(url).port
    task_id, = label_studio.upload_images(ls_project, [dataset.image_path(IMAGES[0])])
    ui = label_studio.connect_ml_backend(ls_project, f"http://127.0.0.1:{port}")  # as connected in the UI
    own = label_studio.post("/api/webhooks", json={"project": ls_project, "url": "http://127.0.0.1:9/notify"})
    (ui_hook,) = ml_webhooks(label_studio, ls_project)  # Label Studio made it with the ML backend

    spellings = [f"http://localhost:{port}", f"http://localhost:{port}/", f"http://127.0.0.1:{port}"]
    for spelling in spellings:
        code, out, err = connect(ls_project, spelling)
        assert code == 0 and "already connected" in out, out + err
        assert [m["id"] for m in ml_backends(label_studio, ls_project)] == [ui]
        assert [h["id"] for h in ml_webhooks(label_studio, ls_project)] == [ui_hook["id"]]
    assert "the same instance id" in connect(ls_project, spellings[0])[1]  # it says how it knew

    # what earlier releases left: a second ML backend under another spelling, deleted in Label Studio later
    # (its webhook stays), then another one: every annotation event arrives twice
    extra = label_studio.connect_ml_backend(ls_project, f"http://localhost:{port}/")
    label_studio.request("DELETE", f"/api/ml/{extra}")
    another = label_studio.connect_ml_backend(ls_project, f"http://localhost:{port}")
    assert len(ml_webhooks(label_studio, ls_project)) == 2 and len(ml_backends(label_studio, ls_project)) == 2
    label_studio.create_annotation(task_id, box_result(IMAGES[0]))
    status = lambda: requests.get(f"{url}/train/status", params={"project": ls_project}, timeout=5).json()
    wait_for(lambda: log_path.read_text().count('"duplicate": true') == 1, 30, "the second delivery")
    assert status()["events_recorded"] == 1 and status()["pending_annotations"] == 1

    code, out, err = connect(ls_project, f"http://localhost:{port}", "--score-column")
    assert f"removed duplicate ML backend {ui}" in out and "removed duplicate webhook" in out, out + err
    assert [m["id"] for m in ml_backends(label_studio, ls_project)] == [another]  # --url's spelling is kept
    assert len(ml_webhooks(label_studio, ls_project)) == 1
    assert code == 2 and "Retrieve predictions" in err  # --score-column: no predictions of the version yet
    assert own["id"] in [h["id"] for h in label_studio.get("/api/webhooks", params={"project": ls_project})]

    label_studio.retrieve_predictions(ls_project)
    code, out, err = connect(ls_project, f"http://127.0.0.1:{port}", "--score-column")
    assert code == 0 and "Review worst-first" in out, out + err
    assert len(ml_backends(label_studio, ls_project)) == 1 and len(ml_webhooks(label_studio, ls_project)) == 1


def test_a_refused_webhook_is_an_error_with_the_reason_and_nothing_half_made(label_studio, ls_project, backend,
                                                                          connect, fake_dns):
    url, _, _ = backend
    port = urlsplit(url).port
    name = local_host_name()
    fake_dns.answers.update({"sam-backend": ["127.0.0.1"], "localhost": ["127.0.0.1"]})  # no real lookup here
    if name:
        fake_dns.answers[name] = ["127.0.0.1"]
    code, out, err = connect(ls_project, f"http://sam-backend:{port}")  # a compose service name: no dot
    assert code == 2 and "nothing was connected" in err and "Enter a valid URL" in err, out + err
    assert "dotted" in err  # what to do
    assert ml_backends(label_studio, ls_project) == [] and ml_webhooks(label_studio, ls_project) == []

    if name is None:
        pytest.skip("this machine's name has a dot or does not resolve here: the UI case below needs one without")
    ui = label_studio.connect_ml_backend(ls_project, f"http://{name}:{port}")  # Label Studio makes no webhook
    assert ml_webhooks(label_studio, ls_project) == []
    code, out, err = connect(ls_project, f"http://{name}:{port}")
    assert code == 2 and f"ML backend {ui}" in err and "stays connected" in err and "Enter a valid URL" in err, err
    code, out, err = connect(ls_project, f"http://localhost:{port}")
    assert code == 0 and "already connected" in out and "webhook" in out and "created" in out, out + err
    assert [m["id"] for m in ml_backends(label_studio, ls_project)] == [ui]
    (hook,) = ml_webhooks(label_studio, ls_project)
    assert hook["url"] == f"http://localhost:{port}/webhook"


def test_boxes_drawn_after_a_retrieve_get_masks_on_the_next(label_studio, ls_project, backend, connect):
    url, _, env = backend
    boxed, later, never = label_studio.upload_images(ls_project, [dataset.image_path(i) for i in IMAGES])
    label_studio.create_annotation(boxed, box_result(IMAGES[0]))
    code, out, err = connect(ls_project, url)
    assert code == 0, out + err
    label_studio.retrieve_predictions(ls_project)
    (first,) = label_studio.predictions(boxed)
    assert len(first["result"]) == len(dataset.annotations(IMAGES[0]))
    assert label_studio.predictions(later) == [] and label_studio.predictions(never) == []  # nothing stored

    label_studio.create_annotation(later, box_result(IMAGES[1]))  # the annotator draws boxes afterwards
    label_studio.retrieve_predictions(ls_project)
    (masks,) = label_studio.predictions(later)
    assert len(masks["result"]) == len(dataset.annotations(IMAGES[1]))
    assert all(r["type"] == "brushlabels" for r in masks["result"]) and masks["model_version"] == first["model_version"]
    assert [p["id"] for p in label_studio.predictions(boxed)] == [first["id"]]  # asked once
    assert label_studio.predictions(never) == []

    # "Review worst-first" (sorted by the prediction score, lowest first): the task without boxes has no score
    # and comes last, after every real mask, not first with an empty prediction's 0
    code, out, err = connect(ls_project, url, "--score-column")
    assert code == 0, out + err
    (tab,) = [v for v in label_studio.get("/api/dm/views", params={"project": ls_project})
              if v["data"]["title"] == "Review worst-first"]
    listed = label_studio.get("/api/tasks", params={"project": ls_project, "view": tab["id"], "fields": "all"})
    assert [t["id"] for t in listed["tasks"]][-1] == never and listed["tasks"][-1]["predictions_score"] is None

    # an empty prediction an earlier release stored for a task without boxes: the pre-label job deletes it
    label_studio.post("/api/predictions", json={"task": never, "result": [], "score": 0.0,
                                                "model_version": first["model_version"]})
    listed = label_studio.get("/api/tasks", params={"project": ls_project, "view": tab["id"], "fields": "all"})
    assert listed["tasks"][0]["id"] == never  # what the issue saw: an empty prediction ranks first
    done = subprocess.run([sys.executable, "-m", "ml_backend", "prelabel", "--project", str(ls_project), "--json"],
                          cwd=REPO_ROOT, env={**os.environ, **env, "LOG_LEVEL": "WARNING"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])["result"]
    assert (report["skipped"], report["no_boxes"], report["empty_removed"], report["predicted"]) == (2, 1, 1, 0)
    assert label_studio.predictions(never) == []
    listed = label_studio.get("/api/tasks", params={"project": ls_project, "view": tab["id"], "fields": "all"})
    assert [t["id"] for t in listed["tasks"]][-1] == never  # its stale empty prediction no longer ranks it first
