"""Label Studio's labelling config and regions <-> plain geometry: prompts as drawn (percent of the image) and in
pixels, masks as brush RLE / polygon regions. The region-level half of the protocol (ml_backend/protocol.py holds
the request and answer level); nothing else in the backend reads or writes these shapes.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import cv2
import numpy as np
from label_studio_sdk.converter.brush import mask2rle
from label_studio_sdk.label_interface import LabelInterface

from trainer.types import Box, Mask, Point

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


@dataclass(frozen=True)
class BoxPrompt:
    """A rectangle as drawn: top-left corner and size in percent of the image, rotation in degrees about that
    corner (Label Studio's rectanglelabels value)."""

    x: float
    y: float
    width: float
    height: float
    rotation: float = 0.0
    label: str | None = None

    def in_pixels(self, width: int, height: int) -> Box:
        """The pixel box of an image `width` x `height`, clipped to it; a rotated rectangle becomes its
        axis-aligned bounding box."""
        x, y = self.x * width / 100, self.y * height / 100
        w, h = self.width * width / 100, self.height * height / 100
        angle = math.radians(self.rotation)
        corners = [(0, 0), (w, 0), (w, h), (0, h)]
        xs = [x + cx * math.cos(angle) - cy * math.sin(angle) for cx, cy in corners]
        ys = [y + cx * math.sin(angle) + cy * math.cos(angle) for cx, cy in corners]
        return Box(min(xs), min(ys), max(xs), max(ys), self.label).clipped(width, height)


def box_prompt(region: dict) -> BoxPrompt:
    """A rectanglelabels region -> BoxPrompt; ProtocolError names a missing or non-finite number."""
    value = region.get("value")
    if not isinstance(value, dict):
        raise ProtocolError("rectangle region has no value object")
    x, y = _number(value, "x"), _number(value, "y")
    w, h = _number(value, "width"), _number(value, "height")
    rotation = _number(value, "rotation") if value.get("rotation") is not None else 0.0
    return BoxPrompt(x, y, w, h, rotation, _first_label(value))


def region_to_box(region: dict, width: int, height: int) -> Box:
    """A rectanglelabels region (percent of the image, optional rotation in degrees) -> pixel box."""
    return box_prompt(region).in_pixels(width, height)


def _is_positive(region: dict, value: dict) -> bool:
    """A click's kind as Label Studio's editor (boolean `is_positive` on a smart key point; Alt-click: false) and
    its SDK (0 / 1) send it, on the region or in its value; missing means positive."""
    flag = region.get("is_positive", value.get("is_positive"))
    if flag is None:
        return True
    if isinstance(flag, bool) or (isinstance(flag, (int, float)) and flag in (0, 1)):
        return bool(flag)
    if isinstance(flag, str) and flag.strip().lower() in ("true", "false", "1", "0"):
        return flag.strip().lower() in ("true", "1")
    raise ProtocolError(f"keypoint is_positive must be true/false or 1/0, got {str(flag)[:40]!r}")


@dataclass(frozen=True)
class ClickPrompt:
    """A keypoint as clicked, in percent of the image; positive = foreground."""

    x: float
    y: float
    positive: bool = True
    label: str | None = None

    def in_pixels(self, width: int, height: int) -> Point:
        return Point(self.x * width / 100, self.y * height / 100, self.positive, self.label)


def click_prompt(region: dict) -> ClickPrompt:
    """A keypointlabels region -> ClickPrompt, positive or negative (`_is_positive`)."""
    value = region.get("value")
    if not isinstance(value, dict):
        raise ProtocolError("keypoint region has no value object")
    x, y = _number(value, "x"), _number(value, "y")
    return ClickPrompt(x, y, _is_positive(region, value), _first_label(value))


def region_to_point(region: dict, width: int, height: int) -> Point:
    """A keypointlabels region (percent) -> pixel point."""
    return click_prompt(region).in_pixels(width, height)


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


def region_score(mask: Mask) -> float:
    """A mask's score: its expected IoU (trainer.quality, calibrated for the served version), in [0, 1];
    an empty mask is a failure: 0."""
    return 0.0 if mask.area == 0 else min(1.0, max(0.0, float(mask.score)))
