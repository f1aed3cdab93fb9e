"""Drive Label Studio's editor in a real browser: Debian's chromium through Playwright, loopback only.

The browser never downloads anything and never leaves this machine: every request to a host other than
127.0.0.1 / localhost / ::1 is aborted by the test (Label Studio's page asks for Sentry's CDN), and host
names other than those resolve to nothing.

Usage::

    with launch_chromium() as browser:
        editor = Editor.open(browser, label_studio_url, USERNAME, PASSWORD)
        editor.open_task(project_id, task_id)
        editor.regions()
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, sync_playwright  # noqa: E402
from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: E402

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

# Console errors Label Studio 1.23.2's own page prints with no backend involved (seen in every session):
KNOWN_NOISE = (
    # HeidiTips asks for tips that the open-source server does not serve.
    ("404 on /heidi-tips", re.compile(r"/heidi-tips$")),
    # Picking a label or a smart tool makes the editor request an icon module object as an <img src>.
    ("404 on [object Object] image", re.compile(r"/\[object%20Object\]$")),
)

# Region reads done in the page, from the editor's own store (window.Htx).
_REGIONS_JS = """() => window.Htx.annotationStore.selected.regions.map(r => ({
  id: r.cleanId, type: r.type, origin: r.origin, hidden: r.hidden,
  labels: r.results.flatMap(x => (x.type.endsWith('labels') && Array.isArray(x.mainValue)) ? x.mainValue : []),
  results: r.results.map(x => x.type),
  points: r.points ? r.points.length : null,
  bbox: r.bboxCoords ? [r.bboxCoords.left, r.bboxCoords.top, r.bboxCoords.right, r.bboxCoords.bottom] : null,
}))"""
_SUGGESTIONS_JS = """() => Array.from(window.Htx.annotationStore.selected.suggestions.values()).map(r => ({
  id: r.cleanId, type: r.type, results: r.results.map(x => x.type)}))"""
_SUGGESTED_BRUSHES_JS = """() => Array.from(window.Htx.annotationStore.selected.suggestions.values())
  .filter(r => r.type === 'brushregion').map(r => r.serialize())"""
_SHOW_ONLY_JS = """(ids) => { for (const r of window.Htx.annotationStore.selected.regions) {
  if (r.hidden === ids.includes(r.cleanId)) r.toggleHidden(); } }"""
_DATA_MANAGER_ROWS_JS = """() => {
  const ids = Array.from(document.querySelectorAll('.lsf-table-head [data-id^="tasks:"]')).map(e => e.dataset.id);
  return Array.from(document.querySelectorAll('.lsf-table-row')).map(row => {
    const cells = Array.from(row.children).filter(c => c.tagName === 'DIV').map(c => c.textContent.trim());
    return Object.fromEntries(ids.map((id, i) => [id, cells[i]]));
  });
}"""
_IMAGE_RECT_JS = """() => { const shown = Array.from(document.querySelectorAll('img')).filter(i => i.offsetParent);
  const img = shown.sort((a, b) => b.width * b.height - a.width * a.height)[0];
  const r = img.getBoundingClientRect(); return {x: r.x, y: r.y, width: r.width, height: r.height}; }"""


def chromium_path() -> str:
    """Debian's chromium (apt), or $CHROMIUM; fail with the install hint if it is missing."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        raise FileNotFoundError("chromium not found: `apt-get install chromium` (scripts/test.sh does) "
                                "or set $CHROMIUM")
    return path


@contextlib.contextmanager
def launch_chromium() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True,
            args=["--no-sandbox",  # root in CI
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"])
        try:
            yield browser
        finally:
            browser.close()


def is_loopback(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("blob", "data", "about") or (parts.hostname or "") in LOOPBACK_HOSTS


@dataclass
class PageLog:
    """What the page reported: console errors, uncaught page errors, requests the test refused."""

    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    reloads: int = 0  # editor reloads open_task needed (Label Studio's double-load race)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(f"{message.text} @ {message.location.get('url', '')}")

    def unexpected_errors(self) -> list[str]:
        """Page errors, and console errors that are neither known Label Studio noise nor a blocked request."""
        unexpected = list(self.page_errors)
        for error in self.console_errors:
            url = error.rsplit(" @ ", 1)[-1]
            if url in self.blocked or any(pattern.search(url) for _, pattern in KNOWN_NOISE):
                continue
            unexpected.append(error)
        return unexpected


class Editor:
    """One logged-in tab of Label Studio, with reads of the editor's store and of its canvas."""

    def __init__(self, page: Page, base_url: str, log: PageLog) -> None:
        self.page, self.base_url, self.log = page, base_url.rstrip("/"), log

    @classmethod
    def open(cls, browser: Browser, base_url: str, username: str, password: str) -> "Editor":
        """A fresh context (no cookies, no service workers) logged in through the login page."""
        context = browser.new_context(viewport={"width": 1400, "height": 900}, service_workers="block")
        log = PageLog()

        def route(route, request: Request) -> None:
            if is_loopback(request.url):
                route.continue_()
            else:
                log.blocked.append(request.url)
                route.abort("blockedbyclient")

        context.route("**/*", route)
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.on("console", log.on_console)
        page.on("pageerror", lambda error: log.page_errors.append(f"page error: {error}"))
        editor = cls(page, base_url, log)
        page.goto(f"{editor.base_url}/user/login")
        page.fill("#email", username)
        page.fill("#password", password)
        page.click("button.login-button")
        page.wait_for_url(lambda url: "/user/login" not in url)
        return editor

    def close(self) -> None:
        self.page.context.close()

    # -- navigation ------------------------------------------------------------------------------------
    def open_task(self, project_id: int, task_id: int, predictions: int = 0, tries: int = 3) -> None:
        """Open a task in the editor and wait until it shows (at least) that many stored predictions.

        Opened by URL, the Data Manager loads the task twice, and in some runs here the editor then ends up
        without the task's predictions although the API returned them both times (a race in Label Studio's
        frontend; a reload shows them). So: wait for the page to settle, and reload if they are missing."""
        self.page.goto(f"{self.base_url}/projects/{project_id}/data?task={task_id}")
        shown = (f"() => window.Htx?.annotationStore?.selected && String(window.Htx.task?.id) === '{task_id}' "
                 f"&& window.Htx.annotationStore.predictions.length >= {predictions}")
        for attempt in range(tries):
            self.page.wait_for_load_state("networkidle")
            try:
                self.page.wait_for_function(shown, timeout=15_000)
                self.page.wait_for_timeout(1000)  # a second load may still replace the store
                if self.page.evaluate(shown):
                    break
            except PlaywrightTimeout:
                pass
            if attempt == tries - 1:
                raise AssertionError(f"task {task_id} never showed {predictions} predictions in the editor")
            self.log.reloads += 1
            self.page.reload()
        self.page.locator(".konvajs-content").first.wait_for()

    def data_manager_rows(self, project_id: int, tab_id: int, count: int) -> list[dict[str, str]]:
        """The Data Manager's table on one tab, top to bottom: per row, column id ("tasks:id",
        "tasks:predictions_score", ...) -> the text shown; waits until `count` rows show."""
        self.page.goto(f"{self.base_url}/projects/{project_id}/data?tab={tab_id}")
        self.page.wait_for_function(f"() => document.querySelectorAll('.lsf-table-row').length >= {count}")
        self.page.wait_for_load_state("networkidle")
        return self.page.evaluate(_DATA_MANAGER_ROWS_JS)

    def select_prediction(self, prediction_id: int):
        """Click the tab of a stored prediction; returns the tab (a locator)."""
        tabs = self.page.locator(".lsf-annotation-button", has=self.page.locator("[title^='Prediction score']"))
        tabs.first.wait_for()
        for i in range(tabs.count()):
            tabs.nth(i).click()
            if self.selected() == ("prediction", str(prediction_id)):
                self.page.mouse.move(5, 890)  # away from the tab's tooltip, which covers the canvas
                return tabs.nth(i)
        in_store = self.page.evaluate("() => window.Htx.annotationStore.predictions.map(p => String(p.pk))")
        raise AssertionError(f"no editor tab shows prediction {prediction_id} ({tabs.count()} prediction tabs; "
                             f"predictions in the editor's store: {in_store}; task {self.page.url})")

    def selected(self) -> tuple[str, str | None]:
        """(type, pk) of what the editor shows: ("prediction", "12"), ("annotation", None) for a draft."""
        kind, pk = self.page.evaluate("() => { const s = window.Htx.annotationStore.selected; "
                                      "return [s.type, s.pk == null ? null : String(s.pk)]; }")
        return kind, pk

    def accept_prediction(self, prediction_id: int) -> str:
        """The prediction tab's ⋮ → "Duplicate Annotation" → Submit; returns the saved annotation's pk."""
        self.select_prediction(prediction_id).locator(".lsf-annotation-button__trigger").click()
        self.page.get_by_text("Duplicate Annotation").first.click()
        self.page.wait_for_function("() => window.Htx.annotationStore.selected.type === 'annotation'")
        self.page.get_by_role("button", name="Submit").click()
        self.page.wait_for_function("() => window.Htx.annotationStore.selected.pk != null")
        return self.selected()[1]

    # -- the store ---------------------------------------------------------------------------------------
    def regions(self) -> list[dict]:
        return self.page.evaluate(_REGIONS_JS)

    def drawn_regions(self, ids: list[str]) -> list[dict]:
        """These regions, once the editor has laid them out (a new brush has no bounding box until drawn)."""
        self.page.wait_for_function("(ids) => ids.every(id => window.Htx.annotationStore.selected.regions"
                                    ".some(r => r.cleanId === id && r.bboxCoords))", arg=ids)
        return [r for r in self.regions() if r["id"] in ids]

    def suggestions(self) -> list[dict]:
        return self.page.evaluate(_SUGGESTIONS_JS)

    def serialized(self) -> list[dict]:
        """The selected annotation's results as Label Studio would save them."""
        return self.page.evaluate("() => window.Htx.annotationStore.selected.serializeAnnotation()")

    # -- auto-annotation -----------------------------------------------------------------------------------
    def enable_auto_annotation(self) -> None:
        if not self.page.evaluate("() => window.Htx.autoAnnotation"):
            self.page.get_by_text("Auto-Annotation", exact=True).click()
        assert self.page.evaluate("() => window.Htx.autoAnnotation")

    def choose_smart_tool(self, name: str, control_index: int) -> None:
        """Open the smart tools, pick one ("rectangle-tool", "key-point-tool"), then the label of the
        control_index-th labels control (in config order) so that drawing makes a labelled prompt."""
        smart = self.page.locator(f".lsf-tool_smart[aria-label='{name}']")
        if not smart.is_visible():
            self.page.locator(".lsf-tool_smart:visible").last.click()  # the smart group's button
        smart.click()
        self.choose_label(control_index)
        self.page.wait_for_function(f"() => !!document.querySelector(\".lsf-tool_smart.lsf-tool_active[aria-label='{name}']\")")

    def choose_label(self, control_index: int) -> None:
        """Pick the first label of the control_index-th labels control (the editor drops it after each region)."""
        self.page.locator(".lsf-labels").nth(control_index).locator(".lsf-label").first.click()

    def image_rect(self) -> dict:
        self.page.locator(".konvajs-content").first.scroll_into_view_if_needed()
        return self.page.evaluate(_IMAGE_RECT_JS)

    def _to_screen(self, x: float, y: float, size: tuple[int, int]) -> tuple[float, float]:
        rect = self.image_rect()
        width, height = size
        return rect["x"] + x * rect["width"] / width, rect["y"] + y * rect["height"] / height

    def drag_box(self, box: tuple[float, float, float, float], size: tuple[int, int]) -> None:
        """Draw a box given in image pixels (x0, y0, x1, y1) on an image of size (width, height)."""
        x0, y0 = self._to_screen(box[0], box[1], size)
        x1, y1 = self._to_screen(box[2], box[3], size)
        mouse = self.page.mouse
        mouse.move(x0, y0)
        mouse.down()
        mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=4)
        mouse.move(x1, y1, steps=4)
        mouse.up()

    def click_at(self, x: float, y: float, size: tuple[int, int], alt: bool = False) -> None:
        """A click at image pixel (x, y); with Alt held, a smart key point is a negative click."""
        if alt:
            self.page.keyboard.down("Alt")
        try:
            self.page.mouse.click(*self._to_screen(x, y, size))
        finally:
            if alt:
                self.page.keyboard.up("Alt")

    def wait_for_suggestions(self, count: int, timeout_ms: int = 60_000) -> list[dict]:
        self.page.wait_for_function(
            f"() => window.Htx.annotationStore.selected.suggestions.size >= {count}", timeout=timeout_ms)
        return self.suggestions()

    def suggested_brushes(self) -> list[dict]:
        """The brush results of the current suggestions, serialized as Label Studio would save them."""
        return self.page.evaluate(_SUGGESTED_BRUSHES_JS)

    def wait_for_new_suggestions(self, previous: set[str], count: int, timeout_ms: int = 60_000) -> list[dict]:
        """Wait until the suggestions are `count` regions none of which is in `previous` (ids)."""
        self.page.wait_for_function(
            """([previous, count]) => { const ids = Array.from(
                 window.Htx.annotationStore.selected.suggestions.values()).map(r => r.cleanId);
               return ids.length >= count && ids.every(id => !previous.includes(id)); }""",
            arg=[sorted(previous), count], timeout=timeout_ms)
        return self.suggestions()

    def accept_suggestions(self) -> None:
        self.page.locator(".lsf-auto-accept__action_type_accept").click()
        self.page.wait_for_function("() => window.Htx.annotationStore.selected.suggestions.size === 0")

    # -- the canvas ------------------------------------------------------------------------------------------
    def image_pixels(self, show_only: list[str]) -> np.ndarray:
        """The displayed image (H x W x 3 int) with only the regions whose ids are given shown."""
        self.page.evaluate(_SHOW_ONLY_JS, show_only)
        self.page.wait_for_timeout(400)  # Konva redraws on the next animation frames
        rect = self.image_rect()
        png = self.page.screenshot(clip=rect)
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)

    def drawn_fraction(self, region: dict, bare: np.ndarray, shown: np.ndarray) -> float:
        """Share of pixels in the region's bounding box (percent of the image) that drawing it changed."""
        height, width = bare.shape[:2]
        left, top, right, bottom = region["bbox"]
        x0, x1 = int(left * width / 100), int(np.ceil(right * width / 100)) + 1
        y0, y1 = int(top * height / 100), int(np.ceil(bottom * height / 100)) + 1
        changed = np.abs(shown[y0:y1, x0:x1] - bare[y0:y1, x0:x1]).sum(-1) > 30
        return float(changed.mean()) if changed.size else 0.0

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
