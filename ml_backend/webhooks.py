"""Label Studio webhook bodies -> plain training events."""
from __future__ import annotations

from dataclasses import dataclass

from .protocol import LabelConfig, ProtocolError, parse_label_config, project_id

ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED",
           "START_TRAINING")


@dataclass(frozen=True)
class WebhookEvent:
    """action; project id; annotations = how many completed annotations it adds, changes or deletes."""

    action: str
    project: str
    annotations: int


def _completed(items: object) -> int:
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        return 0
    return sum(1 for a in items if isinstance(a, dict) and not a.get("was_cancelled"))


def parse_webhook(body: dict) -> WebhookEvent | None:
    """The event, or None for an action the backend does not act on. Malformed bodies raise ProtocolError."""
    action = body.get("action")
    if not isinstance(action, str) or not action:
        raise ProtocolError("webhook body has no action")
    if action not in ACTIONS:
        return None
    project = project_id(body.get("project"))
    if project is None:
        task = body.get("task") if isinstance(body.get("task"), dict) else {}
        project = project_id(task.get("project"))
    if project is None:
        raise ProtocolError(f"{action} webhook names no project")
    if action == "START_TRAINING":
        return WebhookEvent(action, project, 0)
    if action == "ANNOTATIONS_DELETED":
        deleted = body.get("annotations")
        return WebhookEvent(action, project, len(deleted) if isinstance(deleted, list) else 1)
    annotations = body.get("annotation", body.get("annotations"))
    if annotations is None:
        raise ProtocolError(f"{action} webhook has no annotation")
    return WebhookEvent(action, project, _completed(annotations))


@dataclass(frozen=True)
class NewTasks:
    """A TASKS_CREATED event: the project, its label config and the new tasks (Label Studio's dicts)."""

    project: str
    config: LabelConfig
    tasks: list[dict]


def parse_new_tasks(body: dict) -> NewTasks | None:
    """The tasks of a TASKS_CREATED body (Label Studio sends the tasks and the project with its label config),
    None for any other action. A body without tasks or without a config this backend serves raises
    ProtocolError."""
    if body.get("action") != "TASKS_CREATED":
        return None
    project_body = body.get("project") if isinstance(body.get("project"), dict) else {}
    project = project_id(project_body)
    tasks = body.get("tasks")
    if project is None or not isinstance(tasks, list):
        raise ProtocolError("TASKS_CREATED webhook needs project and tasks (send_payload on)")
    config = parse_label_config(project_body.get("label_config") or "")
    return NewTasks(project, config, [t for t in tasks if isinstance(t, dict)])
