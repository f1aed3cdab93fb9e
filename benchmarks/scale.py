"""Project scale benchmark (issue 17): Retrieve predictions, pre-warm and the bulk pre-labelling job against
their bound, /predict latency while pre-warm runs, the first click on a pre-warmed image, a 10,000-task call; each
with the encoder on torch and on the default runtime (INFERENCE_RUNTIME=auto: ONNX Runtime on a CPU, measured
once its background export is ready), in one run, so the ratios compare (issue 31).

Run: .venv/bin/python -m benchmarks.scale   -> benchmarks/results/scale.json
In one process (one backend worker) with the default model; images come from a local stand-in host, the bulk job
talks to a real Label Studio 1.23 on 127.0.0.1. Every set of images is new to the backend when it is used (each
runtime's backend has its own MODEL_DIR and caches).
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import machine
from ml_backend.backend import SamBackend
from ml_backend.prelabel import prelabel_project
from ml_backend.protocol import image_refs, parse_label_config, parse_predict_request
from ml_backend.settings import Settings
from tests.image_server import serve_files
from tests.label_studio import rect_result, start_label_studio
from tests.test_scale import CONFIG, TOKEN, box_task, distinct_images
from trainer.images import MAX_PIXELS, decode_image
from trainer.inference_runtime import InferenceRuntime
from trainer.onnx_encoder import OnnxImageEncoder
from trainer.types import Box, Prompts

PER_SET = 16  # new images per measurement
OUT = Path(__file__).parent / "results" / "scale.json"


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


def peak_rss_during(fn) -> tuple[object, float]:
    """fn()'s value and the highest resident memory (MB) sampled every 10 ms while it ran."""
    peak, done = [rss_mb()], threading.Event()

    def sample():
        while not done.is_set():
            peak.append(rss_mb())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        value = fn()
    finally:
        done.set()
        sampler.join()
    return value, max(peak)


def measure(runtime: str, tmp: Path, ls) -> dict:
    """Every measurement with the encoder on `runtime`, in fresh folders under tmp/runtime."""
    config = parse_label_config(CONFIG)

    def batch(tasks: list[dict], context: dict | None = None):
        """A /predict body for project 7 as the route parses it (the editor's when `context` is given)."""
        body = {"tasks": tasks, "label_config": CONFIG, "project": "7"}
        return parse_predict_request(body | ({"params": {"context": context}} if context else {}), 10**6)

    images = tmp / "images"  # the same files for each runtime: new to each runtime's backend
    if not images.exists():
        images.mkdir()
        distinct_images(images, 6 * PER_SET)
    paths = sorted(images.iterdir())
    tmp = tmp / runtime
    sets = [paths[i * PER_SET:(i + 1) * PER_SET] for i in range(6)]
    files = {f"/data/upload/7/{p.name}": p for p in paths}
    urls = {p: f"/data/upload/7/{p.name}" for p in paths}
    with serve_files(files, TOKEN) as image_host:
        settings = Settings(label_studio_url=image_host, label_studio_api_key=TOKEN, model_dir=tmp / "models",
                            inference_runtime=InferenceRuntime(runtime), export_dir=tmp / "exports")
        backend = SamBackend(settings)
        segmenter = backend.segmenter
        if isinstance(segmenter.encoder, OnnxImageEncoder):
            assert segmenter.encoder.ready(600), segmenter.encoder._fallback
        segmenter.embed(decode_image(paths[-1].read_bytes(), MAX_PIXELS))  # warm-up

        # 1. the bound: encoder + one box decode per new image, bare runtime
        encode_s, decode_s = [], []
        for path in sets[0]:
            image = decode_image(path.read_bytes(), MAX_PIXELS)
            started = time.perf_counter()
            embedding = segmenter.embed(image)
            encode_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            segmenter.decode(embedding, Prompts(boxes=(Box(51, 51, 154, 128, "nucleus"),)))
            decode_s.append(time.perf_counter() - started)
        per_task_bound_s = statistics.mean(encode_s) + statistics.mean(decode_s)

        # 2. Retrieve predictions: one call with new images, no deadline reached
        tasks = [box_task(i, urls[p]) for i, p in enumerate(sets[1])]
        started = time.perf_counter()
        answer = backend.predict(batch(tasks))
        retrieve_s = time.perf_counter() - started
        assert answer.answered == len(tasks)

        # 3. pre-warm throughput
        backend.prewarm_tasks("7", image_refs([box_task(100 + i, urls[p]) for i, p in enumerate(sets[2])], config))
        started = time.perf_counter()
        assert backend.prewarmer.wait_idle(600)
        prewarm_s = time.perf_counter() - started

        # 4. a warm 10-box /predict while pre-warm is idle, busy, idle again
        warm = [box_task(1000, urls[sets[1][0]])]
        warm[0]["annotations"][0]["result"] = [rect_result(5 + 8 * i, 5 + 8 * i, 20, 20, 100, 100, "nucleus")
                                               for i in range(10)]

        def live_calls(n: int) -> list[float]:
            samples = []
            for _ in range(n):
                started = time.perf_counter()
                backend.predict(batch(warm))
                samples.append(time.perf_counter() - started)
            return samples

        idle_before = live_calls(10)
        backend.prewarm_tasks("7", image_refs([box_task(200 + i, urls[p]) for i, p in enumerate(sets[3])], config))
        time.sleep(0.5)
        busy, busy_rounds = [], 0
        while backend.prewarmer.status()["queued"] > 1 and busy_rounds < 40:
            busy += live_calls(1)
            time.sleep(0.3)  # a user's pace: pre-warm runs between calls
            busy_rounds += 1
        backend.prewarmer.wait_idle(600)
        idle_after = live_calls(10)
        idle_median = statistics.median(idle_before + idle_after)

        # 5. first interactive click on a pre-warmed image (disk) vs an immediate second click (memory)
        first, second = [], []
        for i, path in enumerate(sets[2][:8]):
            query = batch([box_task(300 + i, urls[path], with_box=False)],
                          {"result": [rect_result(20, 20, 40, 30, 100, 100, "nucleus")]})
            for samples in (first, second):
                started = time.perf_counter()
                backend.predict(query)
                samples.append(time.perf_counter() - started)

        # 6. 10,000 tasks in one call (3 s budget): memory and answer time
        many = {f"/data/upload/7/many/{i}.png": sets[4][i % PER_SET] for i in range(10_000)}
        with serve_files(many, TOKEN) as many_host:
            big = SamBackend(dataclasses.replace(settings, label_studio_url=many_host, predict_deadline_s=3.0,
                                                 prewarm_queue=100, model_dir=tmp / "models-many"), segmenter)
            big_tasks = [box_task(i, u) for i, u in enumerate(many)]
            before = rss_mb()
            started = time.perf_counter()
            big_answer, peak = peak_rss_during(lambda: big.predict(batch(big_tasks)))
            many_s = time.perf_counter() - started

    # 7. the bulk job through a real Label Studio
    project = ls.create_project(f"bench prelabel {runtime}", CONFIG)
    task_ids = ls.upload_many(project, sets[5])
    ls.import_predictions(project, [{"task": t, "model_version": "detector", "score": 1.0,
                                     "result": [rect_result(20, 20, 40, 30, 100, 100, "nucleus")]}
                                    for t in task_ids])
    job_settings = dataclasses.replace(settings, label_studio_url=ls.url, label_studio_api_key=ls.token,
                                       model_dir=tmp / "models-job", prewarm=False)
    job_backend = SamBackend(job_settings, segmenter)
    started = time.perf_counter()
    report = prelabel_project(job_settings, str(project), job_backend)
    job_s = time.perf_counter() - started
    assert report["predicted"] == len(task_ids), report

    bound_rate = 1 / per_task_bound_s
    return {
        "runtime": str(segmenter.encoder.runtime) if isinstance(segmenter.encoder, OnnxImageEncoder) else "torch",
        "bound": {"encode_s": round(statistics.mean(encode_s), 3), "decode_1_box_s": round(statistics.mean(decode_s), 4),
                  "tasks_per_s": round(bound_rate, 3)},
        "retrieve_predictions": {"tasks_per_s": round(len(tasks) / retrieve_s, 3),
                                 "vs_bound": round(len(tasks) / retrieve_s / bound_rate, 3)},
        "bulk_prelabel_job": {"tasks": len(task_ids), "seconds": round(job_s, 1),
                              "tasks_per_s": round(len(task_ids) / job_s, 3),
                              "vs_bound": round(len(task_ids) / job_s / bound_rate, 3)},
        "prewarm": {"images_per_s": round(PER_SET / prewarm_s, 3),
                    "vs_encoder_only": round(PER_SET / prewarm_s * statistics.mean(encode_s), 3)},
        "predict_10_boxes_warm": {"idle_median_ms": round(1000 * idle_median, 1),
                                  "prewarm_running_median_ms": round(1000 * statistics.median(busy), 1),
                                  "slowdown": round(statistics.median(busy) / idle_median, 3),
                                  "calls_while_prewarm_ran": len(busy)},
        "first_click_after_prewarm": {"first_median_ms": round(1000 * statistics.median(first), 1),
                                      "second_median_ms": round(1000 * statistics.median(second), 1),
                                      "target_ms": round(1000 * (1.5 * statistics.median(second) + 0.1), 1),
                                      "within_target": statistics.median(first) <= 1.5 * statistics.median(second) + 0.1},
        "ten_thousand_tasks": {"deadline_s": 3.0, "answer_s": round(many_s, 2), "answered": big_answer.answered,
                               "deferred": big_answer.deferred, "rss_before_mb": round(before, 1),
                               "rss_peak_mb": round(peak, 1), "rss_growth_mb": round(peak - before, 1)},
    }


def main() -> None:
    at_start = machine()
    with tempfile.TemporaryDirectory() as tmp, start_label_studio(Path(tmp) / "ls") as ls:
        runs = {runtime: measure(runtime, Path(tmp), ls) for runtime in ("torch", "auto")}
    torch_run, auto_run = runs["torch"], runs["auto"]
    result = {
        "machine": at_start,
        "setup": f"{PER_SET} new distinct images per measurement (dsb2018 train images and their flips), one box "
                 "each; SamBackend in one process (one worker), default model lite_medsam; torch, then auto (the "
                 "default: ONNX Runtime on this CPU) in the same run",
        **runs,
        "auto_vs_torch": {name: round(auto_run[part][key] / torch_run[part][key], 3) for name, part, key in (
            ("bound_tasks_per_s", "bound", "tasks_per_s"),
            ("retrieve_predictions_tasks_per_s", "retrieve_predictions", "tasks_per_s"),
            ("bulk_prelabel_tasks_per_s", "bulk_prelabel_job", "tasks_per_s"),
            ("prewarm_images_per_s", "prewarm", "images_per_s"))},
    }
    result["machine"]["loadavg_end"] = machine()["loadavg"]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
