"""What annotators see: Label Studio 1.23's editor in a real browser (Debian's chromium via Playwright).

A project whose config has both BrushLabels and PolygonLabels (and smart RectangleLabels / KeyPointLabels):
every predicted result must be its own region of the right type and label, drawn on the image; accepting a
prediction must save every result intact; Auto-Annotation must turn a drawn box or click into mask regions on
the canvas. Each test reads the editor's own store (window.Htx) and its canvas pixels, fails on page errors
and on console errors beyond Label Studio's known noise (tests/browser.py: KNOWN_NOISE), and leaves a
screenshot in test-artifacts/ when it fails.

Also the reviewer's view: the Data Manager's "Review worst-first" tab that `connect --score-column` sets up.

README_SCREENSHOT=1 also writes docs/editor-predictions.png and docs/review-worst-first.png (the README's pictures).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from tests import dataset
from tests.backend_server import start_backend
from tests.browser import Editor, launch_chromium
from tests.label_studio import PASSWORD, USERNAME, brush_mask, rect_result

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts"
README_PICTURE = REPO_ROOT / "docs" / "editor-predictions.png"
REVIEW_PICTURE = REPO_ROOT / "docs" / "review-worst-first.png"

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="nucleus"/></RectangleLabels>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="nucleus"/></KeyPointLabels>
  <BrushLabels name="mask" toName="image"><Label value="nucleus"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="nucleus"/></PolygonLabels>
</View>"""
BOX_CONTROL, CLICK_CONTROL = 0, 1  # order of the labels controls in CONFIG
PREDICTED_IMAGE = 18  # 320 x 256, purple-stained nuclei; a detector's boxes for 6 of them
INTERACTIVE_IMAGE = 6  # 256 x 256, fluorescent nuclei; boxes and clicks drawn in the editor
DRAWN = 0.03  # share of a region's bounding box its drawing must change (a polygon outline alone is ~0.08)
REGION_TYPE = {"brushlabels": "brushregion", "polygonlabels": "polygonregion"}


@pytest.fixture(scope="module")
def backend_url(label_studio, tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("browser-backend")
    env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
           "MODEL_DIR": str(root / "models"), "WORKERS": "1", "THREADS": "4", "TRAINING_RUNNER": "off"}
    with start_backend(env, root / "gunicorn.log") as url:
        yield url


@pytest.fixture(scope="module")
def project(label_studio, backend_url) -> dict:
    """A project with a detector's boxes on one task, the backend connected and Retrieve predictions done."""
    project_id = label_studio.create_project("browser", CONFIG)
    predicted, interactive = label_studio.upload_images(
        project_id, [dataset.image_path(PREDICTED_IMAGE), dataset.image_path(INTERACTIVE_IMAGE)])
    info = dataset.image_info(PREDICTED_IMAGE)
    boxes = [rect_result(*a["bbox"], info["width"], info["height"], "nucleus")
             for a in dataset.annotations(PREDICTED_IMAGE)[:6]]
    label_studio.post("/api/predictions", json={"task": predicted, "result": boxes, "model_version": "detector"})
    ml_id = label_studio.connect_ml_backend(project_id, backend_url, is_interactive=True)
    label_studio.retrieve_predictions(project_id)
    (sam,) = [p for p in label_studio.predictions(predicted) if p["model_version"] != "detector"]
    assert len(sam["result"]) == 12, "one brush and one polygon per box"
    return {"id": project_id, "ml": ml_id, "predicted": predicted, "interactive": interactive, "sam": sam}


@pytest.fixture(scope="module")
def browser():
    with launch_chromium() as chromium:
        yield chromium


@pytest.fixture
def editor(browser, label_studio, request) -> Iterator[Editor]:
    """A logged-in tab; on teardown it fails the test on page errors or unexpected console errors, and saves
    a screenshot of a failed test under test-artifacts/."""
    tab = Editor.open(browser, label_studio.url, USERNAME, PASSWORD)
    try:
        yield tab
        failed = getattr(request.node, "report_call", None)
        if failed is not None and failed.failed:
            path = ARTIFACTS / f"{request.node.name}.png"
            tab.screenshot(path)
            print(f"screenshot of the failure: {path}")
        print(f"editor reloads for Label Studio's task-load race: {tab.log.reloads}")
        unexpected = tab.log.unexpected_errors()
        assert not unexpected, f"the page reported errors: {unexpected}"
        assert all(not url.startswith(label_studio.url) for url in tab.log.blocked)
    finally:
        tab.close()


def test_every_predicted_result_is_its_own_region_drawn_on_the_image(editor, project):
    editor.open_task(project["id"], project["predicted"], predictions=2)
    editor.select_prediction(project["sam"]["id"])
    results = project["sam"]["result"]
    regions = {region["id"]: region for region in editor.regions()}

    assert len(regions) == len(results), "results sharing an id were merged into one region"
    for result in results:
        region = regions[result["id"]]
        assert region["type"] == REGION_TYPE[result["type"]]
        assert region["results"] == [result["type"]], "one result per region"
        assert region["labels"] == ["nucleus"]
        assert region["origin"] == "prediction"
        if result["type"] == "polygonlabels":
            assert region["points"] == len(result["value"]["points"]) >= 3

    regions = {region["id"]: region for region in editor.drawn_regions(list(regions))}
    bare = editor.image_pixels(show_only=[])
    for kind in REGION_TYPE.values():
        ids = [region_id for region_id, region in regions.items() if region["type"] == kind]
        shown = editor.image_pixels(show_only=ids)
        for region_id in ids:
            fraction = editor.drawn_fraction(regions[region_id], bare, shown)
            assert fraction > DRAWN, f"{kind} {region_id} is not drawn ({fraction:.3f} of its box changed)"

    editor.image_pixels(show_only=list(regions))
    if os.environ.get("README_SCREENSHOT"):
        editor.screenshot(README_PICTURE)


def test_accepting_a_prediction_saves_every_result_intact(editor, project, label_studio):
    editor.open_task(project["id"], project["predicted"], predictions=2)
    annotation_id = editor.accept_prediction(project["sam"]["id"])

    saved = label_studio.get(f"/api/annotations/{annotation_id}")["result"]
    predicted = {r["id"]: r for r in project["sam"]["result"]}
    ids = [r["id"] for r in saved]
    assert len(ids) == len(set(ids)) == len(predicted), f"saved ids {ids}"
    assert set(ids) == set(predicted)
    for result in saved:
        original = predicted[result["id"]]
        assert result["type"] == original["type"]
        assert result["value"][result["type"]] == ["nucleus"]
        if result["type"] == "polygonlabels":
            assert "rle" not in result["value"]
            assert np.allclose(result["value"]["points"], original["value"]["points"], atol=1e-6)
        else:
            assert "points" not in result["value"]
            assert dataset.iou(brush_mask(result), brush_mask(original)) > 0.99


def test_auto_annotation_box_and_click_give_masks_on_the_canvas(editor, project):
    editor.open_task(project["id"], project["interactive"])
    editor.enable_auto_annotation()
    info = dataset.image_info(INTERACTIVE_IMAGE)
    size = (info["width"], info["height"])
    by_area = sorted(dataset.annotations(INTERACTIVE_IMAGE), key=lambda a: -a["area"])
    boxed, clicked = by_area[0], by_area[1]

    x, y, w, h = boxed["bbox"]
    editor.choose_smart_tool("rectangle-tool", BOX_CONTROL)
    editor.drag_box((x, y, x + w, y + h), size)
    _accept_and_check(editor, boxed)

    x, y, w, h = clicked["bbox"]
    editor.choose_smart_tool("key-point-tool", CLICK_CONTROL)
    editor.click_at(x + w / 2, y + h / 2, size)
    _accept_and_check(editor, clicked)


def test_a_negative_click_takes_its_spot_out_of_the_mask(editor, project):
    """Smart key point: a click gives a suggested mask; an Alt-click (negative) inside it, before accepting, gives a
    new suggestion without that spot that still covers the first click (the editor sends both clicks, positive then
    negative); accepted, it is saved as such."""
    editor.open_task(project["id"], project["interactive"])
    editor.enable_auto_annotation()
    info = dataset.image_info(INTERACTIVE_IMAGE)
    size = (info["width"], info["height"])
    # not the two largest nuclei: the test before drew regions on them in this task, and Label Studio may have
    # kept them as a draft; a click on a region selects it instead of making a key point
    target = sorted(dataset.annotations(INTERACTIVE_IMAGE), key=lambda a: -a["area"])[2]
    x, y, w, h = target["bbox"]
    editor.choose_smart_tool("key-point-tool", CLICK_CONTROL)
    first = (x + w / 2, y + h / 2)
    editor.click_at(*first, size)
    suggested = {s["id"] for s in editor.wait_for_suggestions(2)}
    (brush,) = editor.suggested_brushes()
    before = brush_mask(brush)
    ys, xs = np.nonzero(before)
    far = int(np.argmax((xs - first[0]) ** 2 + (ys - first[1]) ** 2))  # the mask's pixel farthest from the click
    spot = (xs[far] + 0.5 - 0.3 * (xs[far] + 0.5 - first[0]), ys[far] + 0.5 - 0.3 * (ys[far] + 0.5 - first[1]))
    assert before[int(spot[1]), int(spot[0])]
    editor.choose_label(CLICK_CONTROL)  # the smart key point stays chosen; its label is dropped after each click
    editor.click_at(*spot, size, alt=True)
    editor.wait_for_new_suggestions(suggested, 2)
    clicks = [r for r in editor.serialized() if r["type"] == "keypointlabels"]
    assert [c.get("is_positive") for c in clicks] == [True, False]  # what the editor sent (dropped on accepting)
    regions_before = {region["id"] for region in editor.regions()}
    editor.accept_suggestions()
    new = {r["id"] for r in editor.regions() if r["id"] not in regions_before}
    (saved,) = [r for r in editor.serialized() if r["id"] in new and r["type"] == "brushlabels"]
    after = brush_mask(saved)
    assert not after[int(spot[1]), int(spot[0])], "the negative click's spot is still in the mask"
    assert after[int(first[1]), int(first[0])], "the mask lost the positive click"


def _accept_and_check(editor: Editor, target: dict) -> None:
    """The suggestions for one prompt are a brush and a polygon labelled nucleus; accepted, they are regions
    drawn on the canvas, and the brush covers the target nucleus."""
    before = {region["id"] for region in editor.regions()}
    suggestions = editor.wait_for_suggestions(2)
    assert sorted(s["type"] for s in suggestions) == ["brushregion", "polygonregion"]
    editor.accept_suggestions()
    new = [r for r in editor.regions() if r["id"] not in before and r["type"] in REGION_TYPE.values()]
    assert sorted(r["type"] for r in new) == ["brushregion", "polygonregion"]
    assert all(r["labels"] == ["nucleus"] and r["origin"] == "prediction" for r in new)

    (brush,) = [r for r in editor.serialized() if r["id"] in {n["id"] for n in new} and r["type"] == "brushlabels"]
    iou = dataset.iou(brush_mask(brush), dataset.gt_mask(target))
    assert iou > 0.5, f"the mask misses the nucleus (IoU {iou:.2f})"

    bare = editor.image_pixels(show_only=[])
    for region in editor.drawn_regions([r["id"] for r in new]):
        shown = editor.image_pixels(show_only=[region["id"]])
        fraction = editor.drawn_fraction(region, bare, shown)
        assert fraction > DRAWN, f"{region['type']} is not drawn ({fraction:.3f} of its box changed)"
    editor.image_pixels(show_only=[r["id"] for r in editor.regions()])


REVIEW_IMAGES = (18, 6, 13, 28)  # a detector's boxes on each: SAM masks of different quality


def test_review_tab_sorts_tasks_by_the_backend_score(editor, label_studio, backend_url, tmp_path):
    """connect --score-column: the project's model version becomes the served one (once it has predictions of
    it) and a "Review worst-first" tab shows the Prediction score column, lowest first, with the backend's
    task scores; before, the column stays empty (Label Studio averages only the project's model version)."""
    project_id = label_studio.create_project("review", CONFIG)
    tasks = label_studio.upload_images(project_id, [dataset.image_path(i) for i in REVIEW_IMAGES])
    for task, image_id in zip(tasks, REVIEW_IMAGES):
        info = dataset.image_info(image_id)
        boxes = [rect_result(*a["bbox"], info["width"], info["height"], "nucleus")
                 for a in dataset.annotations(image_id)[:5]]
        label_studio.post("/api/predictions", json={"task": task, "result": boxes, "model_version": "detector"})
    label_studio.connect_ml_backend(project_id, backend_url, is_interactive=True)
    connect = [sys.executable, "-m", "ml_backend", "connect", "--project", str(project_id), "--url", backend_url,
               "--score-column"]
    env = {**os.environ, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.token,
           "MODEL_DIR": str(tmp_path / "models")}
    early = subprocess.run(connect, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert early.returncode == 2 and "Retrieve predictions" in early.stderr, early.stderr  # no predictions yet

    label_studio.retrieve_predictions(project_id)
    listed = label_studio.get(f"/api/tasks?project={project_id}&fields=all")["tasks"]
    assert all(t["predictions_score"] is None for t in listed), "the column was filled before the setup"
    done = subprocess.run(connect, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Review worst-first" in done.stdout, done.stdout + done.stderr
    served = label_studio.get(f"/api/projects/{project_id}")["model_version"]
    assert served.endswith("@base")
    scores = {}
    for task in tasks:
        (sam,) = [p for p in label_studio.predictions(task) if p["model_version"] == served]
        assert 0 <= sam["score"] <= 1
        scores[task] = sam["score"]
    assert len(set(scores.values())) == len(tasks)

    (tab,) = [v for v in label_studio.get(f"/api/dm/views?project={project_id}")
              if v["data"]["title"] == "Review worst-first"]
    rows = editor.data_manager_rows(project_id, tab["id"], len(tasks))
    shown = [(int(r["tasks:id"]), float(r["tasks:predictions_score"])) for r in rows]
    assert [task for task, _ in shown] == sorted(scores, key=scores.get), "not sorted worst-first"
    assert all(abs(score - scores[task]) < 0.001 for task, score in shown)
    if os.environ.get("README_SCREENSHOT"):
        editor.screenshot(REVIEW_PICTURE)
    again = subprocess.run(connect, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "tab 'Review worst-first' ok" in again.stdout
