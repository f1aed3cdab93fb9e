"""The learning loop through a real Label Studio 1.23: time from "Start Training" to a served new version.

Run: .venv/bin/python -m benchmarks.training_loop   -> benchmarks/results/training_loop.json
Label Studio and the backend (gunicorn, embedded runner, default training settings) run on 127.0.0.1.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import requests

from benchmarks.common import machine
from tests import dataset
from tests.backend_server import start_backend
from tests.label_studio import SAM_LABEL_CONFIG, gt_brush_results, start_label_studio

TRAIN_IMAGES = dataset.splits()["train"][:20]
OUT = Path(__file__).parent / "results" / "training_loop.json"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, start_label_studio(Path(tmp) / "ls") as ls:
        env = {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token, "MODEL_DIR": str(Path(tmp) / "models"),
               "WORKERS": "2", "MIN_ANNOTATIONS": "100000"}
        with start_backend(env, Path(tmp) / "gunicorn.log") as url:
            project = ls.create_project("training loop benchmark", SAM_LABEL_CONFIG)
            task_ids = ls.upload_images(project, [dataset.image_path(i) for i in TRAIN_IMAGES])
            for task_id, image_id in zip(task_ids, TRAIN_IMAGES):
                ls.create_annotation(task_id, gt_brush_results(image_id))
            ml_id = ls.connect_ml_backend(project, url)
            setup = lambda: requests.post(f"{url}/setup", json={"project": f"{project}.1"}, timeout=10).json()
            before = setup()["model_version"]
            started = time.perf_counter()
            ls.start_training(ml_id)
            answered = time.perf_counter() - started
            while setup()["model_version"] == before:
                status = requests.get(f"{url}/train/status", params={"project": project}, timeout=10).json()
                last = status["last"] or {}
                if last.get("state") == "failed":
                    raise SystemExit(f"training failed: {last.get('error')}")
                if last.get("state") == "succeeded" and not (last.get("result") or {}).get("promoted"):
                    raise SystemExit(f"training finished without promotion: {(last.get('result') or {}).get('reason')}")
                if time.perf_counter() - started > 1800:
                    raise SystemExit("no new version within 30 minutes")
                time.sleep(1)
            served = time.perf_counter() - started
            status = requests.get(f"{url}/train/status", params={"project": project}, timeout=10).json()
    report = {"machine": machine(), "images": len(TRAIN_IMAGES), "objects": sum(len(dataset.annotations(i))
                                                                               for i in TRAIN_IMAGES),
              "start_training_answer_s": answered, "start_training_to_served_version_s": served,
              "version_before": before, "version_after": status["model_version"], "job": status["last"]}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "job"}, indent=2))


if __name__ == "__main__":
    main()
