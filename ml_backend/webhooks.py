"""Label Studio webhook bodies -> plain training events."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .protocol import ImageRef, ProtocolError, image_refs, parse_label_config, project_id

ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED",
           "START_TRAINING")


@dataclass(frozen=True)
class WebhookEvent:
    """action; project id; annotations = how many completed annotations it adds, changes or deletes; key =
    what makes two deliveries of it one event (None: every delivery counts, as START_TRAINING's)."""

    action: str
    project: str
    annotations: int
    key: str | None = None

    @property
    def explicit(self) -> bool:
        """A person asked to train now (Label Studio's Start Training): the core's plain flag for it."""
        return self.action == "START_TRAINING"


def event_key(action: str, items: object) -> str | None:
    """The annotations' ids and updated_at (ids alone for a deletion), hashed: the same annotation state
    arriving through two webhooks of the project has one key. None when an annotation lacks them."""
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list) or not items or not all(isinstance(a, dict) for a in items):
        return None
    deleted = action == "ANNOTATIONS_DELETED"
    parts = []
    for annotation in items:
        if annotation.get("id") is None or (not deleted and not annotation.get("updated_at")):
            return None
        parts.append(f"{annotation['id']}" if deleted else f"{annotation['id']}@{annotation['updated_at']}")
    kind = "deleted" if deleted else "annotations"
    return hashlib.sha256(f"{kind}:{','.join(sorted(parts))}".encode()).hexdigest()[:32]


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
        return WebhookEvent(action, project, len(deleted) if isinstance(deleted, list) else 1,
                            event_key(action, deleted))
    annotations = body.get("annotation", body.get("annotations"))
    if annotations is None:
        raise ProtocolError(f"{action} webhook has no annotation")
    return WebhookEvent(action, project, _completed(annotations), event_key(action, annotations))


@dataclass(frozen=True)
class NewTasks:
    """A TASKS_CREATED event: the project, how many tasks it created and the images of those that name one."""

    project: str
    tasks: int
    images: list[ImageRef]


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
    return NewTasks(project, sum(isinstance(t, dict) for t in tasks), image_refs(tasks, config))
