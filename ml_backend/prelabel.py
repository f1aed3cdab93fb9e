"""Pre-label a whole project through Label Studio's API: every task with boxes (in its latest annotation or
prediction) gets a mask prediction of the served model_version, posted in batches with label-studio-sdk.

Resumable: tasks that already have a (non-empty) prediction of that version are skipped, so a job that stopped
(a Label Studio restart, a killed worker) continues where it was when run again; Label Studio being unreachable
for a while is waited out. Runs as a job (see training.py) or in the foreground from the command line.
Tasks without boxes are counted apart (`no_boxes`), never as done and never given a prediction: one would mark
them done for the version in Label Studio, and boxes drawn later would never get masks. An empty prediction of
the version (earlier releases stored one for tasks without boxes) is deleted (`empty_removed`) for that reason.
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
from .label_studio import ConnectError, HTTPFailure, ProjectClient
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
    skipped: had the version, no_boxes: nothing to prompt with, empty_masks: boxes but every mask empty (not
    posted), failed with why, empty_removed: stale empty predictions deleted) and `predicted`: posted by this
    run in all."""
    backend = backend or SamBackend(dataclasses.replace(settings, prewarm=False))
    client = backend.client(project)  # the project's one client: these calls and the images share its token
    try:
        client.require()
    except ConnectError as exc:
        raise PrelabelError(str(exc)) from None
    version = backend.model_version(project)
    report = {"project": project, "model_version": version, "tasks": 0, "skipped": 0, "no_boxes": 0,
              "empty_masks": 0, "empty_removed": 0, "predicted": 0, "failed": 0, "failures": []}
    waited_since, passes = None, 0
    with tqdm(disable=not bar, unit="task", desc=f"project {project}") as shown:
        while True:  # passes over the project; a pass cut short by Label Studio going away starts again
            try:
                config = protocol.parse_label_config(client.label_config())
                waited_since, posted_before = None, report["predicted"]
                report.update(tasks=0, skipped=0, no_boxes=0, empty_masks=0, failed=0, failures=[])  # this pass's
                for page in client.tasks(fields="all"):
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
        log.info("label studio model version", extra={"project": project,
                                                      "outcome": client.follow_served_version(version)})
    return report


def _prelabel_page(backend: SamBackend, client: ProjectClient, project: str, config: protocol.LabelConfig,
                   version: str, page: list[dict], report: dict) -> None:
    todo: list[protocol.PredictTask] = []
    for listed in page:
        stored = protocol.version_predictions(listed, version)
        for empty in stored.empty_ids:
            client.api.delete_prediction(empty)  # it would hold the task "done" in Label Studio for good
            report["empty_removed"] += 1
        if stored.has_regions:
            report["skipped"] += 1
            continue
        try:
            task = protocol.parse_task(listed, config)
        except protocol.ProtocolError as exc:  # a task Label Studio's JSON makes unusable fails alone
            _failed(report, listed.get("id"), str(exc))
            continue
        if task.has_boxes:
            todo.append(task)
        else:
            report["no_boxes"] += 1
    for start in range(0, len(todo), BATCH):
        batch = todo[start:start + BATCH]
        backend.embed_ahead(project, [task.image for task in batch if task.image])
        answer = backend.predict(protocol.PredictRequest(tuple(batch), config, project), deadline_s=math.inf)
        posted = []
        for task, result in zip(batch, answer.answers):
            entry = protocol.import_entry(task.id, result, config, answer.model_version)
            if result.state == protocol.FAILED:
                _failed(report, task.id, result.error)
            elif entry is not None:
                posted.append(entry)
            else:  # its boxes are outside the image, or every mask came out empty
                report["no_boxes" if result.state == protocol.NO_BOXES else "empty_masks"] += 1
        if posted:
            client.api.import_predictions(int(project), posted)
            report["predicted"] += len(posted)


def _failed(report: dict, task_id: object, error: str | None) -> None:
    report["failed"] += 1
    report["failures"] = (report["failures"] + [{"task": task_id, "error": error}])[-50:]


def _summary(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "failures"} | {"failures": report["failures"][-10:]}
