"""Pre-label a whole project through Label Studio's API: every task with boxes (in its latest annotation or
prediction) gets a mask prediction of the served model_version, posted in batches with label-studio-sdk.

Resumable: tasks that already have a prediction of that version are skipped, so a job that stopped (a Label
Studio restart, a killed worker) continues where it was when run again; Label Studio being unreachable for a
while is waited out. Runs as a job (see training.py) or in the foreground from the command line.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Callable

from tqdm import tqdm

from . import protocol
from .backend import SamBackend
from .fetch import image_source
from .label_studio import ConnectError, HTTPFailure, LabelStudioClient
from .settings import Settings

log = logging.getLogger("ml_backend.prelabel")
BATCH = 20  # tasks predicted and posted together
PATIENCE_S = 180.0  # how long an unreachable Label Studio is waited for
MAX_PASSES = 3  # a pass that posted something but also saw failures is followed by another, up to this many


class PrelabelError(RuntimeError):
    """The project cannot be pre-labelled (no connection, a config the backend cannot serve)."""


def _retryable(exc: ConnectError) -> bool:
    return not isinstance(exc, HTTPFailure) or exc.status == 0 or exc.status >= 500


def prelabel_project(settings: Settings, project: str, backend: SamBackend | None = None,
                     progress: Callable[[dict], None] | None = None, bar: bool = False) -> dict:
    """Predict and post every task that needs it; returns the counts of the last pass over the project (tasks,
    skipped: had the version, no_boxes, failed with why) and `predicted`: posted by this run in all."""
    source = image_source(settings, project)
    if not source.label_studio_url or not source.token:
        raise PrelabelError(f"project {project}: no Label Studio URL/token (set LABEL_STUDIO_URL and "
                            "LABEL_STUDIO_API_KEY, or connect the project so /setup provides them)")
    backend = backend or SamBackend(dataclasses.replace(settings, prewarm=False))
    client = LabelStudioClient(source.label_studio_url, source.token)
    version = backend.model_version(project)
    report = {"project": project, "model_version": version, "tasks": 0, "skipped": 0, "no_boxes": 0,
              "predicted": 0, "failed": 0, "failures": []}
    waited_since, passes = None, 0
    with tqdm(disable=not bar, unit="task", desc=f"project {project}") as shown:
        while True:  # passes over the project; a pass cut short by Label Studio going away starts again
            try:
                config = protocol.parse_label_config(client.project(int(project)).get("label_config") or "")
                waited_since, posted_before = None, report["predicted"]
                report.update(tasks=0, skipped=0, no_boxes=0, failed=0, failures=[])  # this pass's counts
                for page in client.tasks(int(project), fields="all"):
                    report["tasks"] += len(page)
                    _prelabel_page(backend, client, project, config, version, page, report)
                    shown.total = max(shown.total or 0, report["tasks"])
                    shown.update(len(page))
                    shown.set_postfix(predicted=report["predicted"], failed=report["failed"])
                    if progress:
                        progress(_summary(report))
                passes += 1
                if report["failed"] and report["predicted"] > posted_before and passes < MAX_PASSES:
                    continue  # failures next to progress may be passing (Label Studio restarting): look again
                break
            except ConnectError as exc:
                if not _retryable(exc):
                    raise PrelabelError(str(exc)) from None
                waited_since = waited_since or time.monotonic()
                if time.monotonic() - waited_since > PATIENCE_S:
                    raise PrelabelError(f"Label Studio unreachable for {PATIENCE_S:.0f} s: {exc}") from None
                log.warning("prelabel waits for Label Studio", extra={"project": project, "error": str(exc)})
                time.sleep(2)
                shown.reset()
            except protocol.ProtocolError as exc:
                raise PrelabelError(f"project {project}: {exc}") from None
    log.info("prelabel finished", extra=_summary(report))
    if report["predicted"] or report["skipped"]:
        from .connect import follow_served_version

        log.info("label studio model version", extra={"project": project,
                                                      "outcome": follow_served_version(settings, project, version)})
    return report


def _prelabel_page(backend: SamBackend, client: LabelStudioClient, project: str, config: protocol.LabelConfig,
                   version: str, page: list[dict], report: dict) -> None:
    todo = []
    for task in page:
        predictions = task.get("predictions") if isinstance(task.get("predictions"), list) else []
        if any(isinstance(p, dict) and p.get("model_version") == version for p in predictions):
            report["skipped"] += 1
        elif not protocol.task_has_boxes(task, config):
            report["no_boxes"] += 1
        else:
            todo.append(task)
    for start in range(0, len(todo), BATCH):
        batch = todo[start:start + BATCH]
        backend.embed_ahead(project, batch, config)
        posted = []
        for task, entry in zip(batch, _predict(backend, batch, config, project)):
            if "error" in entry:
                report["failed"] += 1
                report["failures"] = (report["failures"] + [{"task": task.get("id"), "error": entry["error"]}])[-50:]
            elif entry.get("result"):
                posted.append({"task": task["id"], "result": entry["result"], "score": entry["score"],
                               "model_version": entry["model_version"]})
            else:
                report["no_boxes"] += 1
        if posted:
            client.import_predictions(int(project), posted)
            report["predicted"] += len(posted)


def _predict(backend: SamBackend, tasks: list[dict], config: protocol.LabelConfig, project: str) -> list[dict]:
    """One entry per task, no time budget; a task Label Studio's JSON makes unusable gets an error entry
    instead of failing its batch."""
    try:
        return backend.predict(protocol.PredictRequest(tasks, config, project, None), deadline_s=math.inf).results
    except protocol.ProtocolError as exc:
        if len(tasks) == 1:
            return [protocol.failed(backend.model_version(project), str(exc))]
        return [entry for task in tasks for entry in _predict(backend, [task], config, project)]


def _summary(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "failures"} | {"failures": report["failures"][-10:]}
