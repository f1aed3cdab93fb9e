"""Connect this backend to Label Studio projects (POST /api/ml), once: running it again changes nothing.

    python -m ml_backend connect --project 1 [--project 2 ...] [--url http://sam-backend:9090]
    python -m ml_backend connect --all            every project whose labeling config the backend can serve

Label Studio is reached at LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY (a legacy token or a personal access
token); --url is the backend URL *as Label Studio sees it* (default: $BACKEND_URL, else http://localhost:9090).
Label Studio then checks the backend's /health and /setup itself and creates the project's /webhook.
With --score-column the project's model version becomes the served version: Label Studio's Data Manager then
shows the backend's scores in its "Prediction score" column (it averages only predictions of the project's
model version). Label Studio accepts it only once the project has predictions of that version (Retrieve
predictions first). The backend then moves it along: after a promotion and after pre-labelling.
With BASIC_AUTH_USER / BASIC_AUTH_PASS set (the backend's own credentials), the connection uses Label Studio's
"Use basic auth" and the project's ML webhook carries the same credentials as a header; running it again
repairs a connection made without them. Exit code 0 when every project is connected (now or before), 2 on any
failure.
"""
from __future__ import annotations

import argparse
import base64
import re
import sys

from .label_studio import ConnectError, HTTPFailure, LabelStudioClient
from .settings import Settings

EXIT_FAILED = 2
DEFAULT_TITLE = "SAM (segment anything)"


def _same_url(a: str, b: str) -> bool:
    return a.strip().rstrip("/").lower() == b.strip().rstrip("/").lower()


def _check_config(project: dict) -> str | None:
    """Why the backend cannot serve this project's labeling config, or None when it can."""
    from .protocol import ProtocolError, parse_label_config

    try:
        parse_label_config(project.get("label_config") or "")
    except ProtocolError as exc:
        return str(exc)
    return None


def webhook_headers(basic_auth: tuple[str, str] | None) -> dict[str, str]:
    """The header Label Studio's ML webhook needs to pass the backend's basic auth."""
    if basic_auth is None:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(f"{basic_auth[0]}:{basic_auth[1]}".encode()).decode()}


def ensure_webhook_auth(ls: LabelStudioClient, project_id: int, backend_url: str,
                        basic_auth: tuple[str, str] | None) -> str:
    """Make the project's webhook to `backend_url`/webhook send the credentials (Label Studio creates it
    without any); returns what was done."""
    url = backend_url.rstrip("/") + "/webhook"
    wanted = webhook_headers(basic_auth)
    hooks = [h for h in ls.webhooks(project_id) if _same_url(h.get("url", ""), url)]
    if not hooks:
        ls.create_webhook(project_id, url, wanted)
        return "webhook created"
    changed = [h for h in hooks if (h.get("headers") or {}).get("Authorization") != wanted.get("Authorization")]
    for hook in changed:
        headers = {k: v for k, v in (hook.get("headers") or {}).items() if k.lower() != "authorization"}
        ls.set_webhook_headers(int(hook["id"]), {**headers, **wanted})
    return "webhook credentials updated" if changed else "webhook ok"


def connect_project(ls: LabelStudioClient, project_id: int, backend_url: str, title: str,
                    interactive: bool, basic_auth: tuple[str, str] | None = None) -> tuple[str, int]:
    """Connect one project (with the backend's basic auth, if any, for its calls and its webhook); returns
    ("connected" or "already connected" with what was repaired, ML backend id)."""
    try:
        project = ls.project(project_id)
    except HTTPFailure as exc:
        if exc.status == 404:
            raise ConnectError(f"project {project_id} does not exist on {ls.url} "
                               "(or this token's user cannot see it)") from None
        raise
    problem = _check_config(project)
    if problem:
        raise ConnectError(f"project {project_id} ({project.get('title')!r}): its labeling config cannot be "
                           f"served by the SAM backend: {problem}. It needs an Image, RectangleLabels (and/or "
                           "KeyPointLabels) prompts and a BrushLabels or PolygonLabels output on that image.")
    existing = ls.ml_backends(project_id)
    for ml in existing:
        if _same_url(ml.get("url", ""), backend_url):
            outcome = "already connected"
            if basic_auth or ml.get("auth_method") == "BASIC_AUTH":  # the password is write-only: always set it
                ls.set_ml_backend_auth(int(ml["id"]), project_id, ml["url"], basic_auth)
                outcome += ", credentials set" if basic_auth else ", credentials removed"
            webhook = ensure_webhook_auth(ls, project_id, backend_url, basic_auth)
            if webhook != "webhook ok":
                outcome += f", {webhook}"
            return outcome, int(ml["id"])
    try:
        created = ls.create_ml_backend(project_id, backend_url, title, interactive, basic_auth)
    except HTTPFailure as exc:
        hints = []
        text = str(exc).lower()
        if "not allowed" in text or "private network" in text or exc.status == 403:
            hints.append("Label Studio blocks private/loopback backend URLs unless it runs with "
                         "ML_BLOCK_LOCAL_IP=false (and SSRF_PROTECTION_ENABLED=false for the /webhook)")
        if "can't connect" in text or "health check" in text or "can't resolve" in text:
            hints.append(f"Label Studio could not reach {backend_url}: --url must be the backend's URL as seen "
                         "from the Label Studio server (in docker-compose: http://sam-backend:9090)")
        if "setup" in text or "valid ml backend" in text:
            hints.append("the backend answered /setup with an error: see its log")
        if "401" in text or "unauthorized" in text:
            hints.append("the backend asks for credentials: run connect with the backend's BASIC_AUTH_USER and "
                         "BASIC_AUTH_PASS set")
        raise ConnectError(f"Label Studio refused to connect project {project_id} to {backend_url}: {exc}"
                           + "".join(f"\n  hint: {h}" for h in hints)) from None
    ensure_webhook_auth(ls, project_id, backend_url, basic_auth)
    return "connected", int(created["id"])


def show_scores(ls: LabelStudioClient, project_id: int, served: str) -> str:
    """Point the project's model version at `served` (the version the backend serves), so that the Data
    Manager's "Prediction score" column (it averages only predictions of the project's model version) shows
    the backend's scores; returns what was done. Label Studio accepts a version only once the project holds
    predictions of it: until then ConnectError says what to run first."""
    current = ls.project(project_id).get("model_version")
    if current == served:
        return f"model version {served} (Data Manager's Prediction score column)"
    try:
        ls.set_project_model_version(project_id, served)
    except HTTPFailure as exc:
        if exc.status != 400:
            raise
        raise ConnectError(f"project {project_id} has no predictions of {served} yet, so Label Studio refuses it "
                           f"as the project's model version: run Retrieve predictions in the Data Manager (or "
                           f"`python -m ml_backend prelabel --project {project_id}`), then this again") from None
    return f"model version {current!r} -> {served} (Data Manager's Prediction score column)"


REVIEW_TAB = "Review worst-first"
# Label Studio 1.23's default hidden columns (list view, labeling view), less the prediction score
_HIDDEN = ["tasks:inner_id", "tasks:annotations_results", "tasks:annotations_ids", "tasks:predictions_model_versions",
           "tasks:predictions_results", "tasks:file_upload", "tasks:storage_filename", "tasks:created_at",
           "tasks:updated_at", "tasks:updated_by", "tasks:avg_lead_time", "tasks:draft_exists"]
_HIDDEN_LABELING = _HIDDEN + ["tasks:id", "tasks:completed_at", "tasks:cancelled_annotations",
                              "tasks:total_predictions", "tasks:annotators"]


def ensure_review_tab(ls: LabelStudioClient, project_id: int) -> str:
    """A Data Manager tab that shows the Prediction score column and sorts by it, lowest first (the masks most
    likely wrong on top); created once, by title."""
    if any((v.get("data") or {}).get("title") == REVIEW_TAB for v in ls.views(project_id)):
        return f"tab {REVIEW_TAB!r} ok"
    ls.create_view(project_id, {"title": REVIEW_TAB, "type": "list", "target": "tasks",
                                "ordering": ["tasks:predictions_score"],
                                "filters": {"conjunction": "and", "items": []},
                                "hiddenColumns": {"explore": _HIDDEN, "labeling": _HIDDEN_LABELING}})
    return f"tab {REVIEW_TAB!r} created"


def served_version(ls: LabelStudioClient, project_id: int, ml_id: int, backend_url: str) -> str:
    """The model version the backend serves the project, as Label Studio learns it from /setup."""
    served = ls.refresh_ml_backend(ml_id, project_id, backend_url).get("model_version")
    if not served:
        raise ConnectError(f"project {project_id}: Label Studio has no model version for ML backend {ml_id} "
                           "(did the backend answer /setup?)")
    return served


def follow_served_version(settings: Settings, project: str, served: str) -> str:
    """Keep the Data Manager's score column on the served version: if the project's model version is another
    version of this base model (someone chose to show its scores), move it to `served`; returns what was done.
    Never raises: it runs after a promotion and after pre-labelling, which stand whether or not it works."""
    from .fetch import image_source

    try:
        source = image_source(settings, project)
        if not source.label_studio_url or not source.token:
            return "no Label Studio URL/token"
        ls = LabelStudioClient(source.label_studio_url, source.token)
        current = ls.project(int(project)).get("model_version") or ""
        if current == served or current.split("@")[0] != served.split("@")[0]:
            return f"project model version {current!r}: left as it is"
        return show_scores(ls, int(project), served)
    except (ConnectError, ValueError, OSError) as exc:
        return f"not moved: {exc}"


def add_arguments(parser: argparse.ArgumentParser, settings: Settings) -> None:
    parser.add_argument("--project", type=int, action="append", default=[], metavar="ID",
                        help="project id (repeatable)")
    parser.add_argument("--all", action="store_true",
                        help="every project whose labeling config the backend can serve (others are skipped)")
    parser.add_argument("--url", default=settings.backend_url,
                        help="the backend's URL as Label Studio reaches it (default: $BACKEND_URL or %(default)s)")
    parser.add_argument("--title", default=DEFAULT_TITLE, help="name of the model in Label Studio")
    parser.add_argument("--no-interactive", dest="interactive", action="store_false",
                        help="no interactive pre-annotations (auto-annotation in the editor)")
    parser.add_argument("--label-studio-url", default=settings.label_studio_url, help="default: $LABEL_STUDIO_URL")
    parser.add_argument("--api-key", default=settings.label_studio_api_key,
                        help="default: $LABEL_STUDIO_API_KEY (legacy token or personal access token)")
    parser.add_argument("--score-column", action="store_true",
                        help="set the project's model version to the served one (once the project has predictions "
                             "of it), so the Data Manager's Prediction score column shows the backend's scores; the "
                             "editor then shows stored predictions of that version instead of asking the backend "
                             "when a task opens. Promotions and pre-labelling move it along")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to this long for Label Studio's /health first")


def run(args: argparse.Namespace) -> int:
    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return EXIT_FAILED

    if not args.project and not args.all:
        return fail("name a project with --project ID (repeatable) or use --all")
    if not args.label_studio_url:
        return fail("Label Studio's URL is unknown: set LABEL_STUDIO_URL or pass --label-studio-url")
    if not args.api_key:
        return fail("no Label Studio token: set LABEL_STUDIO_API_KEY or pass --api-key")
    if not re.match(r"^https?://[^/\s]+", args.url):
        return fail(f"--url {args.url!r} is not an http(s) URL")
    settings = args.settings
    basic_auth = ((settings.basic_auth_user, settings.basic_auth_pass)
                  if settings.basic_auth_user and settings.basic_auth_pass else None)
    if basic_auth is None and settings.auth_token:
        return fail("the backend requires a bearer token (AUTH_TOKEN), which Label Studio cannot send: set "
                    "BASIC_AUTH_USER and BASIC_AUTH_PASS (Label Studio's \"Use basic auth\") for Label Studio")

    ls = LabelStudioClient(args.label_studio_url, args.api_key)
    failures = 0
    try:
        if args.wait > 0:
            ls.wait_healthy(args.wait)
        try:
            ls.whoami()
        except HTTPFailure as exc:
            raise ConnectError(f"{exc} (is {ls.url} Label Studio's URL?)") from None
        targets = list(dict.fromkeys(args.project))
        if args.all:
            for project in ls.projects():
                problem = _check_config(project)
                if problem and project["id"] not in targets:
                    print(f"skipped project {project['id']} ({project.get('title')!r}): {problem}")
                elif project["id"] not in targets:
                    targets.append(project["id"])
            if not targets:
                print("no project to connect")
    except ConnectError as exc:
        return fail(str(exc))
    for project_id in targets:
        try:
            outcome, ml_id = connect_project(ls, project_id, args.url, args.title, args.interactive, basic_auth)
        except ConnectError as exc:
            failures += 1
            print(f"error: {exc}", file=sys.stderr)
            continue
        print(f"project {project_id}: {outcome} to {args.url} (ML backend id {ml_id}"
              f"{', basic auth' if basic_auth else ''})")
        if args.score_column:
            try:
                served = served_version(ls, project_id, ml_id, args.url)
                print(f"project {project_id}: {show_scores(ls, project_id, served)}, "
                      f"{ensure_review_tab(ls, project_id)}")
            except ConnectError as exc:
                failures += 1
                print(f"error: {exc}", file=sys.stderr)
    return EXIT_FAILED if failures else 0
