"""Hypothesis strategies for Label Studio-shaped and hostile request bodies (shared by tests and benchmark)."""
from __future__ import annotations

import base64
import io

from hypothesis import strategies as st
from PIL import Image

from tests import dataset

CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="box" toName="image"><Label value="cat"/></RectangleLabels>
<KeyPointLabels name="click" toName="image"><Label value="cat"/></KeyPointLabels>
<BrushLabels name="mask" toName="image"><Label value="cat"/></BrushLabels>
<PolygonLabels name="poly" toName="image"><Label value="cat"/></PolygonLabels></View>"""

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63), st.floats(allow_nan=True),
                    st.text(max_size=30))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                           max_leaves=12)
numbers = st.one_of(st.floats(-1e6, 1e6), st.sampled_from([float("nan"), float("inf"), -float("inf")]), st.integers(-10**9, 10**9),
                    st.text(max_size=5), st.none())
region_value = st.fixed_dictionaries({"x": numbers, "y": numbers, "width": numbers, "height": numbers},
                                     optional={"rotation": numbers, "rectanglelabels": json_values,
                                               "keypointlabels": json_values, "is_positive": json_values})
hostile_regions = st.fixed_dictionaries({"type": st.sampled_from(["rectanglelabels", "keypointlabels", "brushlabels", "x"]),
                                 "value": st.one_of(region_value, json_values)},
                                optional={"from_name": st.sampled_from(["box", "click", "other"]),
                                          "to_name": st.just("image"), "is_positive": json_values})
percent = st.floats(-30, 130, allow_nan=False)
plausible_boxes = st.fixed_dictionaries({
    "type": st.just("rectanglelabels"), "from_name": st.just("box"), "to_name": st.just("image"),
    "value": st.fixed_dictionaries({"x": percent, "y": percent, "width": st.floats(0, 150), "height": st.floats(0, 150),
                                    "rectanglelabels": st.one_of(st.just(["cat"]), st.lists(st.text(max_size=8),
                                                                                            max_size=2))},
                                   optional={"rotation": st.floats(-720, 720)})})
regions = st.one_of(plausible_boxes, hostile_regions)  # boxes that reach the decoder, and worse


def _loadable_data_uri() -> str:
    """A real image (a 96x96 crop of a dsb2018 image) as a data: URI: it loads, so fuzzed prompts reach
    parsing, the encoder and the decoder."""
    buffer = io.BytesIO()
    Image.fromarray(dataset.load_image(4)[:96, :96]).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


LOADABLE_IMAGE = _loadable_data_uri()
LOADABLE_UPLOAD = "/data/upload/1/real.png"  # served by the fuzz tests' stand-in for Label Studio
# image URLs that cannot reach anything off this machine; half of them load (a data: URI, an upload)
image_urls = st.one_of(st.just(LOADABLE_IMAGE), st.just(LOADABLE_UPLOAD), st.just(LOADABLE_IMAGE),
                       st.sampled_from(["/data/upload/1/missing.png", "data:image/png;base64,AAAA", "file:///etc/passwd",
                                        "http://127.0.0.1:9/x.png", "gopher://127.0.0.1/", "", "s3://bucket/key"]),
                       st.text(max_size=20).map(lambda t: "/data/upload/" + t))
hostile_tasks = st.fixed_dictionaries({"id": json_values, "data": st.one_of(st.fixed_dictionaries({"image": image_urls}),
                                                                     json_values)},
                              optional={"annotations": st.one_of(st.lists(st.fixed_dictionaries(
                                  {"result": st.one_of(st.lists(regions, max_size=3), json_values)},
                                  optional={"was_cancelled": json_values, "created_at": json_values}), max_size=2),
                                  json_values),
                                  "predictions": json_values})
plausible_tasks = st.fixed_dictionaries({
    "id": st.integers(1, 10**6), "data": st.fixed_dictionaries({"image": st.sampled_from([LOADABLE_IMAGE, LOADABLE_UPLOAD])}),
    "annotations": st.lists(st.fixed_dictionaries({"result": st.lists(regions, min_size=1, max_size=3)}),
                            min_size=1, max_size=2)})
tasks = st.one_of(plausible_tasks, hostile_tasks)  # tasks whose image loads and whose regions reach the decoder
projects = st.one_of(st.sampled_from(["1.1700000000", "7", "../../etc", "1.2.3"]), json_values)
predict_bodies = st.one_of(
    st.fixed_dictionaries({"tasks": st.lists(tasks, max_size=3), "label_config": st.just(CONFIG)},
                          optional={"project": projects,
                                    "params": st.one_of(json_values, st.fixed_dictionaries(
                                        {"context": st.one_of(st.none(), st.fixed_dictionaries(
                                            {"result": st.lists(regions, max_size=3)}), json_values)}))}),
    st.dictionaries(st.sampled_from(["tasks", "label_config", "params", "project"]), json_values),
    json_values)
setup_bodies = st.one_of(st.fixed_dictionaries({"project": projects},
                                               optional={"schema": st.one_of(st.just(CONFIG), st.text(max_size=40)),
                                                         "hostname": json_values, "access_token": json_values}),
                         json_values)
webhook_bodies = st.one_of(
    st.fixed_dictionaries({"action": st.sampled_from(["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED",
                                                      "ANNOTATIONS_DELETED", "START_TRAINING", "TASKS_CREATED"])},
                          optional={"project": projects, "annotation": json_values, "annotations": json_values,
                                    "task": json_values}),
    json_values)
