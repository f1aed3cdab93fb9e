"""Label Studio JSON <-> plain typed objects, at the request and answer level: parsed once on the way in, formatted
once on the way out; the backend itself sees only the typed objects.

    /predict body   --parse_predict_request-->  PredictRequest: PredictTask (id, ImageRef, box prompts or the
                                                task's own error), the editor's InteractivePrompts
    TaskAnswer      --results / prediction-->   Label Studio's prediction entries
    listed tasks    --image_refs / parse_task / version_predictions-->  what pre-warm and pre-label need

Region-level shapes (percent <-> pixels, brush RLE, polygons, the label config) are in ml_backend/regions.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from trainer.quality import task_score
from trainer.types import Box, Mask, Prompts

from .regions import (MASK_TAGS, BoxPrompt, ClickPrompt, LabelConfig, MaskOutput, ProtocolError,  # noqa: F401
                      box_prompt, click_prompt, mask_to_polygon, mask_to_regions, new_region_id, parse_label_config,
                      region_label, region_score, region_to_box, region_to_point)

PREDICTED, DEFERRED, NO_BOXES, FAILED = "predicted", "deferred", "no_boxes", "failed"  # TaskAnswer states


# -- in: tasks and prompts ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRef:
    """A task's image: its URL (the task's data value) and the task id (presigning cloud URIs needs it)."""

    url: str
    task_id: int | None = None


@dataclass(frozen=True)
class BoxSource:
    """The box prompts of one annotation or prediction, as drawn; `error` when one of its rectangles is
    malformed (reported only if that source is the one used)."""

    boxes: tuple[BoxPrompt, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class PredictTask:
    """One task of a /predict call: its id as Label Studio sent it (for logs), its image (or why it has
    none) and its box prompts, per annotation (latest first) then per prediction (latest first)."""

    id: object
    image: ImageRef | None
    image_error: str | None = None
    sources: tuple[BoxSource, ...] = ()

    @property
    def has_boxes(self) -> bool:
        """Whether any source holds a box prompt (known before the image, and so its size, is)."""
        return bool(self.sources)

    def boxes(self, width: int, height: int) -> tuple[Box, ...]:
        """The pixel boxes of the first source (latest annotation first) that has a non-empty one; ProtocolError
        when that source has a malformed rectangle."""
        for source in self.sources:
            if source.error:
                raise ProtocolError(source.error)
            boxes = tuple(b for b in (p.in_pixels(width, height) for p in source.boxes) if not b.is_empty)
            if boxes:
                return boxes
        return ()


@dataclass(frozen=True)
class InteractivePrompts:
    """The editor's prompt: its boxes (the last non-empty one is used) and every click, in the order drawn
    (the editor sends a smart tool's regions of one label in creation order; the mask takes the last label)."""

    boxes: tuple[BoxPrompt, ...] = ()
    clicks: tuple[ClickPrompt, ...] = ()

    def in_pixels(self, width: int, height: int) -> Prompts:
        boxes = [b for b in (p.in_pixels(width, height) for p in self.boxes) if not b.is_empty]
        if not boxes and not self.clicks:
            raise ProtocolError("interactive context holds no rectanglelabels box or keypointlabels click")
        return Prompts(boxes=tuple(boxes[-1:]), points=tuple(c.in_pixels(width, height) for c in self.clicks))


@dataclass(frozen=True)
class PredictRequest:
    """A checked /predict body: the tasks, the parsed label config, the project id, the editor's prompt
    (None in batch mode) and whether the editor sent it (a context, with or without a prompt)."""

    tasks: tuple[PredictTask, ...]
    config: LabelConfig
    project: str | None = None
    prompt: InteractivePrompts | None = None
    from_editor: bool = False

    @property
    def interactive(self) -> bool:
        return self.prompt is not None


def _regions(items: object) -> list[dict]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise ProtocolError("a result must be a list of regions")
    return [r for r in items if isinstance(r, dict)]


def _is_prompt(region: dict, kind: str, controls: tuple[str, ...]) -> bool:
    return region.get("type") == kind and (not controls or region.get("from_name") in (None, *controls))


def _prompt_sources(task: dict) -> list[list[dict]]:
    """The regions of the task's annotations (latest first), then of its predictions (latest first)."""
    for source in ("annotations", "predictions"):
        listed = task.get(source)
        if listed is not None and not isinstance(listed, list):
            raise ProtocolError(f"task {str(task.get('id'))[:40]}: {source} must be a list, "
                                f"got {type(listed).__name__}")
    sources = []
    for source in ("annotations", "predictions"):
        entries = [e for e in (task.get(source) or []) if isinstance(e, dict) and not e.get("was_cancelled")]
        entries.sort(key=lambda e: (str(e.get("updated_at") or e.get("created_at") or ""), e.get("id") or 0))
        sources.extend(_regions(entry.get("result")) for entry in reversed(entries))
    return sources


def _box_source(rectangles: list[dict]) -> BoxSource:
    try:
        return BoxSource(tuple(box_prompt(r) for r in rectangles))
    except ProtocolError as exc:
        return BoxSource(error=str(exc))


def _task_id(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def image_ref(task: dict, config: LabelConfig) -> ImageRef:
    """The task's image; ProtocolError when the task has no image URL in the config's field."""
    data = task.get("data")
    url = data.get(config.image_key) if isinstance(data, dict) else None
    if not isinstance(url, str) or not url:
        raise ProtocolError(f"task {task.get('id')} has no data.{config.image_key} image URL")
    return ImageRef(url, _task_id(task.get("id")))


def parse_task(task: dict, config: LabelConfig, with_boxes: bool = True) -> PredictTask:
    """A task dict -> PredictTask; its box prompts only `with_boxes` (an interactive call prompts with the
    editor's). ProtocolError for annotations / predictions / results that are not lists."""
    sources = ()
    if with_boxes:
        rectangles = ([r for r in regions if _is_prompt(r, "rectanglelabels", config.box_controls)]
                      for regions in _prompt_sources(task))
        sources = tuple(_box_source(found) for found in rectangles if found)
    try:
        return PredictTask(task.get("id"), image_ref(task, config), None, sources)
    except ProtocolError as exc:
        return PredictTask(task.get("id"), None, str(exc), sources)


def parse_tasks(tasks: list[dict], config: LabelConfig, with_boxes: bool = True) -> tuple[PredictTask, ...]:
    return tuple(parse_task(task, config, with_boxes) for task in tasks)


def image_refs(tasks: list, config: LabelConfig) -> list[ImageRef]:
    """The images of the tasks that name one (for pre-warming; the others' /predict says why)."""
    refs = []
    for task in tasks:
        if isinstance(task, dict):
            try:
                refs.append(image_ref(task, config))
            except ProtocolError:
                continue
    return refs


def parse_context(context: dict, config: LabelConfig) -> InteractivePrompts:
    """The editor's context -> its prompt; ProtocolError when it holds no box or click, or a malformed one."""
    regions = _regions(context.get("result"))
    boxes = tuple(box_prompt(r) for r in regions if _is_prompt(r, "rectanglelabels", config.box_controls))
    clicks = tuple(click_prompt(r) for r in regions if _is_prompt(r, "keypointlabels", config.point_controls))
    if not boxes and not clicks:
        raise ProtocolError("interactive context holds no rectanglelabels box or keypointlabels click")
    return InteractivePrompts(boxes, clicks)


def context_prompts(context: dict, config: LabelConfig, width: int, height: int) -> Prompts:
    """Interactive prompt in pixels: the last drawn box (if any) refined by every click in the context."""
    return parse_context(context, config).in_pixels(width, height)


def task_boxes(task: dict, config: LabelConfig, width: int, height: int) -> list[Box]:
    """Boxes of the task's latest annotation that has any, else of its latest prediction that has any."""
    return list(parse_task(task, config).boxes(width, height))


def task_has_boxes(task: dict, config: LabelConfig) -> bool:
    """Whether the task holds any box prompt (before its image, and so its size, is known)."""
    return parse_task(task, config).has_boxes


def parse_predict_request(body: object, max_tasks: int) -> PredictRequest:
    """Every check of a /predict body; ProtocolError (HTTP 400) names what is wrong. A task's own problem (no
    image URL, a malformed rectangle) stays with the task: it fails alone."""
    if not isinstance(body, dict):
        raise ProtocolError("request body must be a JSON object")
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise ProtocolError("tasks must be a list of task objects")
    if len(tasks) > max_tasks:
        raise ProtocolError(f"{len(tasks)} tasks in one call; at most {max_tasks} (MAX_TASKS_PER_REQUEST)")
    config = parse_label_config(body.get("label_config"))
    params = body.get("params") if isinstance(body.get("params"), dict) else {}
    context = params.get("context")
    if context is not None and not isinstance(context, dict):
        raise ProtocolError("params.context must be an object or null")
    prompt = parse_context(context, config) if context and context.get("result") else None
    return PredictRequest(parse_tasks(tasks, config, with_boxes=prompt is None), config,
                          project_id(body.get("project")), prompt, context is not None)


def project_id(value: object) -> str | None:
    """Label Studio sends project as "<id>.<timestamp>" to /setup and /predict, as an object in webhooks."""
    if isinstance(value, dict):
        value = value.get("id")
    if value is None or isinstance(value, bool):
        return None
    text = str(value).split(".")[0].strip()
    if not text.isdigit():
        raise ProtocolError(f"project must be '<id>' or '<id>.<timestamp>', got {str(value)[:40]!r}")
    return text


# -- out: answers -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskAnswer:
    """One task's outcome: PREDICTED with its masks (none: an empty prediction), or DEFERRED (not reached in
    the call's time), NO_BOXES (a batch task with nothing to prompt with) or FAILED with the reason."""

    state: str
    masks: tuple[Mask, ...] = ()
    error: str | None = None


def prediction(masks: list[Mask] | tuple[Mask, ...], config: LabelConfig, model_version: str) -> dict:
    """A task's prediction entry: all regions, the task's score (`task_score` of its masks' scores, empty ones
    counting 0), the version."""
    result = [region for mask in masks if mask.area > 0 for region in mask_to_regions(mask, config)]
    score = task_score([region_score(m) for m in masks])
    return {"result": result, "score": round(score, 4), "model_version": model_version}


def answer_entry(answer: TaskAnswer, config: LabelConfig, model_version: str) -> dict:
    """One /predict result entry. Only PREDICTED has a "result": Label Studio 1.23 stores no prediction for an
    entry without one and asks again on its next Retrieve predictions (a deferred task; a task without boxes,
    once boxes may have been drawn: a stored empty prediction would mark it done for this version for good; a
    failed one, with the reason)."""
    if answer.state == PREDICTED:
        return prediction(answer.masks, config, model_version)
    if answer.state == DEFERRED:
        return {"model_version": model_version, "deferred": True}
    if answer.state == NO_BOXES:
        return {"model_version": model_version, "no_boxes": True}
    return {"model_version": model_version, "error": answer.error or "failed"}


def results(answers: list[TaskAnswer] | tuple[TaskAnswer, ...], config: LabelConfig, model_version: str) -> list[dict]:
    """The /predict answer's `results`: one entry per task, in task order."""
    return [answer_entry(answer, config, model_version) for answer in answers]


def import_entry(task_id: int, answer: TaskAnswer, config: LabelConfig, model_version: str) -> dict | None:
    """A prediction to store through Label Studio's import API ({task, result, score, model_version}); None
    when the answer has no region to store."""
    entry = prediction(answer.masks, config, model_version) if answer.state == PREDICTED else {}
    return {"task": task_id, **entry} if entry.get("result") else None


@dataclass(frozen=True)
class StoredPredictions:
    """A listed task's predictions of one model version: whether one has regions, and the ids of empty ones."""

    has_regions: bool
    empty_ids: tuple[int, ...]


def version_predictions(task: dict, model_version: str) -> StoredPredictions:
    listed = task.get("predictions") if isinstance(task.get("predictions"), list) else []
    ours = [p for p in listed if isinstance(p, dict) and p.get("model_version") == model_version]
    empty = tuple(int(p["id"]) for p in ours if not p.get("result") and p.get("id") is not None)
    return StoredPredictions(any(p.get("result") for p in ours), empty)
