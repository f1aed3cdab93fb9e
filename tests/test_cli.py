"""`python -m ml_backend` end to end on a tiny COCO subset of dsb2018 (real LiteMedSAM weights)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.dataset import make_coco

REPO = Path(__file__).resolve().parents[1]
SUBSET = {"train": [4, 12, 25], "val": [93], "test": [62]}  # small 256x256 images, 3-4 nuclei each


def run(*args: str, check: bool = True, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "ALLOW"))}
    env.update(LOG_LEVEL="WARNING", **(env_extra or {}))
    done = subprocess.run([sys.executable, "-m", "ml_backend", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def last_json(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A COCO folder with 5 images (symlinks), their annotations and splits.json."""
    return make_coco(tmp_path_factory.mktemp("coco"), SUBSET)


@pytest.fixture(scope="module")
def trained(coco: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """Two training runs: v0001 forced through the gate (margin -1), v0002 held back (margin 1)."""
    model_dir = tmp_path_factory.mktemp("models")
    common = ["--data", str(coco), "--project", "nuclei", "--model-dir", str(model_dir),
              "--max-objects-per-image", "2", "--json"]
    first = last_json(run("train", *common, "--epochs", "2", "--margin", "-1"))
    second = last_json(run("train", *common, "--epochs", "1", "--margin", "1"))
    return model_dir, first, second


def test_train_reports_and_gates(trained: tuple[Path, dict, dict]) -> None:
    model_dir, first, second = trained
    for report in (first, second):
        assert {"version", "promoted", "reason", "gate_miou_current", "gate_miou_new", "gate_score"} <= set(report)
        assert 0 < report["gate_miou_current"] <= 1 and 0 < report["gate_miou_new"] <= 1
        # one held-out image: it is the gate set, none is left to early-stop on (the last epoch is kept)
        assert report["gate_images"] == 1 and report["early_stop_images"] == 0
        assert report["early_stop_miou_best"] is None and report["best_epoch"] == report["epochs_run"]
        assert report["gate_score"]["objects"] == 3 and 0 <= report["gate_score"]["mean_score"] <= 1
    assert first["version"] == "v0001" and first["promoted"] is True and first["compared_with"] == "base"
    assert second["version"] == "v0002" and second["promoted"] is False and "does not beat" in second["reason"]
    assert second["compared_with"] == "v0001" and second["active"] == "v0001"
    assert second["gate_miou_current"] == pytest.approx(first["gate_miou_new"], abs=1e-4)  # same decoder, same gate
    assert second["embeddings_computed"] == 0  # cached on disk by the first run, under the serving key
    manifest = json.loads((model_dir / "projects/nuclei/versions/v0002/manifest.json").read_text())
    assert manifest["parent"] == "v0001" and manifest["promoted"] is False
    assert manifest["base_model"]["identity"].startswith("lite_medsam-")
    assert manifest["hyperparameters"]["lr"] == 1e-4 and manifest["hyperparameters"]["loss"] == "dice-bce"
    assert manifest["data"]["splits"]["train"] == {"images": 3, "objects": 11}
    assert [c["epoch"] for c in manifest["metrics"]["curves"]] == [1]
    assert [c["epoch"] for c in first["curves"]] == [1, 2]
    assert (model_dir / "projects/nuclei/versions/v0002/decoder.safetensors").stat().st_size > 10_000_000


def test_versions_activate_rollback(trained: tuple[Path, dict, dict]) -> None:
    model_dir = str(trained[0])
    where = ["--project", "nuclei", "--model-dir", model_dir, "--json"]
    listing = last_json(run("versions", *where))
    assert listing["active"] == "v0001" and [v["version"] for v in listing["versions"]] == ["v0001", "v0002"]
    assert [v["promoted"] for v in listing["versions"]] == [True, False]
    assert last_json(run("activate", "v0002", *where))["active"] == "v0002"
    assert last_json(run("rollback", *where))["active"] == "v0001"
    assert last_json(run("activate", "base", *where))["active"] is None
    assert last_json(run("rollback", *where))["active"] == "v0001"
    human = run("versions", "--project", "nuclei", "--model-dir", model_dir).stdout
    assert "* v0001" in human and "v0002" in human


def test_eval(trained: tuple[Path, dict, dict], coco: Path) -> None:
    where = ["--data", str(coco), "--project", "nuclei", "--model-dir", str(trained[0]), "--json"]
    base = last_json(run("eval", *where, "--split", "val", "--version", "base"))
    assert base["version"] == "base" and base["n_objects"] == 3
    assert base["miou"] == pytest.approx(trained[1]["gate_miou_current"], abs=1e-4)  # eval == the gate's metric
    assert base["score"]["objects"] == 3 and {"spearman_object", "ece", "auroc_bad"} <= set(base["score"])
    test = last_json(run("eval", *where, "--split", "test", "--version", "v0001"))
    assert test["n_objects"] == 3 and 0 < test["miou"] <= 1 and test["model_version"].endswith("@v0001")
    assert test["per_label"]["nucleus"]["n_objects"] == 3
    assert sum(g["n_objects"] for g in test["by_size"].values()) == 3 and set(test["by_size"]) == {"small", "medium", "large"}


@pytest.mark.parametrize("args, message", [
    (["eval", "--split", "test", "--version", "v0099"], "no version v0099"),
    (["activate", "v0042"], "no version v0042"),
    (["activate", "latest"], "not a version id"),
    (["train", "--data", "/no/such/folder"], "data path not found"),
    (["eval", "--data", "/no/such/folder"], "data path not found"),
    (["versions", "--project", "../etc"], "project name"),
    (["train", "--data", "ls://12"], "LABEL_STUDIO_URL"),
])
def test_errors_are_one_line_exit_2(args: list[str], message: str, trained: tuple[Path, dict, dict], coco: Path) -> None:
    options = {"--data": str(coco), "--project": "nuclei", "--model-dir": str(trained[0])}
    if args[0] in ("activate", "versions"):
        options.pop("--data")
    for key in args:
        options.pop(key, None)
    extra = [x for pair in options.items() for x in pair]
    done = run(*args, *extra, check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in done.stderr


def test_rollback_without_history_fails_cleanly(tmp_path: Path) -> None:
    done = run("rollback", "--project", "empty", "--model-dir", str(tmp_path), check=False)
    assert done.returncode == 2 and "no earlier version" in done.stderr


def test_export_images_follow_the_backend_url_rules(tmp_path: Path) -> None:
    """`--data export.json` fetches http(s) images only from allow-listed hosts, as the backend does: a
    listener on 127.0.0.2 is never hit unless ALLOWED_IMAGE_HOSTS (and ALLOW_PRIVATE_IMAGE_HOSTS) let it."""
    from werkzeug.serving import make_server
    from werkzeug.wrappers import Request, Response

    from ml_backend.annotations import load_label_studio_export
    from tests import dataset
    from tests.label_studio import brush_result

    hits = []

    @Request.application
    def app(request: Request) -> Response:
        hits.append(request.path)
        return Response(dataset.image_path(4).read_bytes(), mimetype="image/png")

    server = make_server("127.0.0.2", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        masks = [dataset.gt_mask(a) for a in dataset.annotations(4)]
        regions = [brush_result(m, "nucleus", f"r{i}") for i, m in enumerate(masks)]
        url = f"http://127.0.0.2:{server.server_port}/pics/4.png"
        tasks = [{"id": 7, "data": {"image": url}, "annotations": [{"id": 1, "result": regions}]}]
        (export := tmp_path / "export.json").write_text(json.dumps(tasks))
        (split,) = {i.split for i in load_label_studio_export(tasks, lambda u, t: None).images}
        where = ["eval", "--data", str(export), "--split", split, "--version", "base", "--project", "p",
                 "--model-dir", str(tmp_path / "models"), "--json"]
        refused = run(*where, check=False)
        assert refused.returncode == 2 and "127.0.0.2" in refused.stderr and "Traceback" not in refused.stderr
        assert hits == []
        allowed = run(*where, env_extra={"ALLOWED_IMAGE_HOSTS": f"127.0.0.2:{server.server_port}",
                                         "ALLOW_PRIVATE_IMAGE_HOSTS": "true"})
        assert last_json(allowed)["n_objects"] == len(masks) and last_json(allowed)["miou"] > 0.5
        assert hits == ["/pics/4.png"]
    finally:
        server.shutdown()


def test_train_waits_for_or_refuses_a_running_job_of_its_project(coco: Path, tmp_path: Path) -> None:
    """A job of project "nuclei" runs (a live process holds the project's lock): `train --no-wait` refuses with
    exit code 3 naming the project and the job; `train` of another project runs meanwhile; `train` without
    --no-wait says on stderr that it waits, and trains once the job has ended."""
    from trainer.jobs import JobStore, TriggerPolicy

    from tests.locks import LockHolder

    model_dir = tmp_path / "models"
    common = ["--data", str(coco), "--model-dir", str(model_dir), "--epochs", "1", "--max-objects-per-image", "1",
              "--margin", "-1", "--json"]
    store = JobStore(model_dir / "jobs.sqlite")
    with LockHolder(model_dir, "nuclei") as holder:
        job_id = store.record_event("nuclei", "START_TRAINING", 0, TriggerPolicy(), explicit=True)[1]
        assert store.claim_due(pid=holder.process.pid, job_id=job_id) is not None
        refused = run("train", "--project", "nuclei", "--no-wait", *common, check=False)
        assert refused.returncode == 3, refused.stderr
        assert f"project nuclei: job {job_id} (train) is running" in refused.stderr and "Traceback" not in refused.stderr
        other = last_json(run("train", "--project", "other", "--no-wait", *common))
        assert other["promoted"] and other["version"] == "v0001"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "ALLOW"))}
        with open(tmp_path / "wait.err", "w") as err:
            waiting = subprocess.Popen([sys.executable, "-m", "ml_backend", "train", "--project", "nuclei", *common],
                                       cwd=REPO, env={**env, "LOG_LEVEL": "WARNING"}, stdout=subprocess.PIPE,
                                       stderr=err, text=True)
        try:
            deadline = time.monotonic() + 60
            while "waiting for it to end" not in (tmp_path / "wait.err").read_text():
                assert waiting.poll() is None and time.monotonic() < deadline, (tmp_path / "wait.err").read_text()
                time.sleep(0.2)
            time.sleep(1)
            assert waiting.poll() is None  # still waiting: nothing of nuclei written meanwhile
            assert not (model_dir / "projects" / "nuclei").exists()
            store.finish(job_id, "succeeded", result={})
            holder.release()
            out, _ = waiting.communicate(timeout=300)
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.wait()
        assert waiting.returncode == 0, (tmp_path / "wait.err").read_text()[-3000:]
        assert json.loads(out.strip().splitlines()[-1])["version"] == "v0001"
        assert f"job {job_id} (train) is running" in (tmp_path / "wait.err").read_text()


def test_prelabel_refuses_with_no_wait_while_the_project_is_busy(tmp_path: Path) -> None:
    """`prelabel --no-wait` meets the same project lock as jobs: exit code 3, one message naming the project."""
    from trainer.jobs import JobStore

    from tests.locks import LockHolder

    model_dir = tmp_path / "models"
    with LockHolder(model_dir, "7"):
        done = run("prelabel", "--project", "7", "--no-wait", check=False, env_extra={"MODEL_DIR": str(model_dir)})
    assert done.returncode == 3, done.stderr
    assert "project 7: test holder is running since" in done.stderr and "not pre-labelling" in done.stderr
    assert JobStore(model_dir / "jobs.sqlite").jobs("7") == []  # refused before queueing anything
