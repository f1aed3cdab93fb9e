"""Label Studio JSON <-> plain typed objects: label config, prompts in pixels, masks as brush RLE / polygons.

Everything Label Studio-shaped (percentages, RLE, region dicts) stays in this file.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import cv2
import numpy as np
from label_studio_sdk.converter.brush import mask2rle
from label_studio_sdk.label_interface import LabelInterface

from trainer.quality import task_score
from trainer.types import Box, Mask, Point, Prompts

MASK_TAGS = {"BrushLabels": "brushlabels", "PolygonLabels": "polygonlabels"}


class ProtocolError(ValueError):
    """A request Label Studio could not have meant: answered with HTTP 400 and this message."""


@dataclass(frozen=True)
class MaskOutput:
    """A control the masks are written to: kind is "brushlabels" or "polygonlabels"."""

    kind: str
    from_name: str
    to_name: str
    labels: tuple[str, ...]

    def label_for(self, prompt_label: str | None) -> str | None:
        """The prompt's label when this control knows it (or knows no labels), else its only/first label."""
        if prompt_label and (not self.labels or prompt_label in self.labels):
            return prompt_label
        return self.labels[0] if self.labels else prompt_label


@dataclass(frozen=True)
class LabelConfig:
    """What the backend needs from a project's labelling config."""

    image_name: str
    image_key: str
    box_controls: tuple[str, ...]
    point_controls: tuple[str, ...]
    outputs: tuple[MaskOutput, ...]


def parse_label_config(xml: str) -> LabelConfig:
    """Find the Image, its RectangleLabels / KeyPointLabels prompts and BrushLabels / PolygonLabels outputs."""
    if not isinstance(xml, str) or not xml.strip():
        raise ProtocolError("label config is missing")
    try:
        interface = LabelInterface(xml)
    except Exception as exc:
        raise ProtocolError(f"label config is not valid XML: {exc}") from exc
    images = [o for o in interface.objects if o.tag == "Image"]
    outputs = []
    for control in interface.controls:
        if control.tag in MASK_TAGS:
            for to_name in control.to_name:
                if any(image.name == to_name for image in images):
                    outputs.append(MaskOutput(MASK_TAGS[control.tag], control.name, to_name,
                                              tuple(control.labels or ())))
    if not outputs:
        raise ProtocolError("label config has no BrushLabels or PolygonLabels control on an Image: "
                            "there is nowhere to put a mask")
    image_name = outputs[0].to_name
    image = next(o for o in images if o.name == image_name)
    value = (image.value or "").lstrip("$")
    if not value:
        raise ProtocolError(f"Image {image_name!r} has no $value naming the task field")

    def prompts_of(tag: str) -> tuple[str, ...]:
        return tuple(c.name for c in interface.controls if c.tag == tag and image_name in c.to_name)

    return LabelConfig(image_name, value, prompts_of("RectangleLabels"), prompts_of("KeyPointLabels"),
                       tuple(o for o in outputs if o.to_name == image_name))


def _first_label(value: dict) -> str | None:
    for key in ("rectanglelabels", "keypointlabels", "labels", "brushlabels", "polygonlabels"):
        labels = value.get(key)
        if isinstance(labels, list) and labels:
            return str(labels[0])
    return None


def region_label(region: dict) -> str:
    """A region's first label, whatever its control; "object" when it has none."""
    value = region.get("value")
    return (_first_label(value) if isinstance(value, dict) else None) or "object"


def _number(value: dict, key: str) -> float:
    number = value.get(key)
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise ProtocolError(f"region value.{key} must be a finite number, got {number!r}")
    return float(number)


def region_to_box(region: dict, width: int, height: int) -> Box:
    """A rectanglelabels region (percent of the image, optional rotation in degrees) -> pixel box.

    A rotated rectangle becomes its axis-aligned bounding box.
    """
    value = region.get("value")
    if not isinstance(value, dict):
        raise ProtocolError("rectangle region has no value object")
    x, y = _number(value, "x") * width / 100, _number(value, "y") * height / 100
    w, h = _number(value, "width") * width / 100, _number(value, "height") * height / 100
    angle = math.radians(_number(value, "rotation") if value.get("rotation") is not None else 0.0)
    corners = [(0, 0), (w, 0), (w, h), (0, h)]
    xs = [x + cx * math.cos(angle) - cy * math.sin(angle) for cx, cy in corners]
    ys = [y + cx * math.sin(angle) + cy * math.cos(angle) for cx, cy in corners]
    return Box(min(xs), min(ys), max(xs), max(ys), _first_label(value)).clipped(width, height)


def region_to_point(region: dict, width: int, height: int) -> Point:
    """A keypointlabels region (percent) -> pixel point; a missing is_positive means positive."""
    value = region.get("value")
    if not isinstance(value, dict):
        raise ProtocolError("keypoint region has no value object")
    positive = region.get("is_positive", value.get("is_positive", True))
    return Point(_number(value, "x") * width / 100, _number(value, "y") * height / 100,
                 positive is not False, _first_label(value))


def _regions(items: object) -> list[dict]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise ProtocolError("a result must be a list of regions")
    return [r for r in items if isinstance(r, dict)]


def _is_prompt(region: dict, kind: str, controls: tuple[str, ...]) -> bool:
    return region.get("type") == kind and (not controls or region.get("from_name") in (None, *controls))


def _boxes_in(regions: list[dict], config: LabelConfig, width: int, height: int) -> list[Box]:
    boxes = [region_to_box(r, width, height) for r in regions
             if _is_prompt(r, "rectanglelabels", config.box_controls)]
    return [b for b in boxes if not b.is_empty]


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


def task_boxes(task: dict, config: LabelConfig, width: int, height: int) -> list[Box]:
    """Boxes of the task's latest annotation that has any, else of its latest prediction that has any."""
    for regions in _prompt_sources(task):
        boxes = _boxes_in(regions, config, width, height)
        if boxes:
            return boxes
    return []


def task_has_boxes(task: dict, config: LabelConfig) -> bool:
    """Whether the task holds any box prompt (before its image, and so its size, is known)."""
    return any(_is_prompt(r, "rectanglelabels", config.box_controls) for regions in _prompt_sources(task)
               for r in regions)


def context_prompts(context: dict, config: LabelConfig, width: int, height: int) -> Prompts:
    """Interactive prompt: the last drawn box (if any) refined by every click in the context."""
    regions = _regions(context.get("result"))
    boxes = _boxes_in(regions, config, width, height)
    points = tuple(region_to_point(r, width, height) for r in regions
                   if _is_prompt(r, "keypointlabels", config.point_controls))
    if not boxes and not points:
        raise ProtocolError("interactive context holds no rectanglelabels box or keypointlabels click")
    return Prompts(boxes=tuple(boxes[-1:]), points=points)


def task_image_url(task: dict, config: LabelConfig) -> str:
    data = task.get("data")
    url = data.get(config.image_key) if isinstance(data, dict) else None
    if not isinstance(url, str) or not url:
        raise ProtocolError(f"task {task.get('id')} has no data.{config.image_key} image URL")
    return url


def mask_to_polygon(mask: Mask, epsilon_px: float = 1.0) -> list[list[float]]:
    """The largest outer contour of the mask, simplified (Douglas-Peucker), in image pixels; [] if none."""
    crop = np.ascontiguousarray(mask.crop, dtype=np.uint8)
    contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    contour = max(contours, key=cv2.contourArea)
    simplified = cv2.approxPolyDP(contour, epsilon_px, True)[:, 0, :]
    if len(simplified) < 3:
        simplified = contour[:, 0, :]
    if len(simplified) < 3:
        return []
    return [[float(x + mask.x0), float(y + mask.y0)] for x, y in simplified]


def new_region_id() -> str:
    """A fresh result id. Label Studio's editor merges results that share an id into ONE region (that is how
    a region carries several controls' values), so every brush and every polygon gets its own."""
    return uuid.uuid4().hex[:10]


def mask_to_regions(mask: Mask, config: LabelConfig) -> list[dict]:
    """One Label Studio region per output control (brush RLE 0/255, polygon in percent), each with its own id.

    A config with both BrushLabels and PolygonLabels gets both, as separate regions linked only by their label:
    sharing an id would make the editor fold the polygon into the brush region and save it without points.
    """
    height, width = mask.image_size
    regions = []
    for output in config.outputs:
        label = output.label_for(mask.label)
        labels = [label] if label else []
        region = {"id": new_region_id(), "from_name": output.from_name, "to_name": output.to_name,
                  "type": output.kind, "original_width": width, "original_height": height,
                  "image_rotation": 0, "score": round(region_score(mask), 4), "readonly": False,
                  "origin": "prediction"}  # the editor marks model-made regions; edits become "prediction-changed"
        if output.kind == "brushlabels":
            full = mask.full().astype(np.uint8) * 255
            region["value"] = {"format": "rle", "rle": mask2rle(full), "brushlabels": labels}
        else:
            points = mask_to_polygon(mask)
            if not points:
                continue
            region["value"] = {"points": [[x * 100 / width, y * 100 / height] for x, y in points],
                               "closed": True, "polygonlabels": labels}
        regions.append(region)
    return regions


def deferred(model_version: str) -> dict:
    """A task not reached within the call's time budget: no "result", so Label Studio stores nothing and
    its next Retrieve predictions asks for it again."""
    return {"model_version": model_version, "deferred": True}


def failed(model_version: str, error: str) -> dict:
    """A task whose image or prompts failed: no "result" (Label Studio stores nothing), the reason."""
    return {"model_version": model_version, "error": error}


def region_score(mask: Mask) -> float:
    """A mask's score: its expected IoU (trainer.quality, calibrated for the served version), in [0, 1];
    an empty mask is a failure: 0."""
    return 0.0 if mask.area == 0 else min(1.0, max(0.0, float(mask.score)))


def prediction(masks: list[Mask], config: LabelConfig, model_version: str) -> dict:
    """A task's prediction entry: all regions, the task's score (`task_score` of its masks' scores, empty ones
    counting 0), the version."""
    result = [region for mask in masks if mask.area > 0 for region in mask_to_regions(mask, config)]
    score = task_score([region_score(m) for m in masks])
    return {"result": result, "score": round(score, 4), "model_version": model_version}


@dataclass(frozen=True)
class PredictRequest:
    """A checked /predict body: the tasks (Label Studio's dicts, checked per task later), the parsed label
    config, the project id and the interactive context (None in batch mode)."""

    tasks: list[dict]
    config: LabelConfig
    project: str | None
    context: dict | None

    @property
    def interactive(self) -> bool:
        return bool(self.context and self.context.get("result"))


def parse_predict_request(body: object, max_tasks: int) -> PredictRequest:
    """Every check of a /predict body; ProtocolError (HTTP 400) names what is wrong."""
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
    return PredictRequest(tasks, config, project_id(body.get("project")), context)


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
