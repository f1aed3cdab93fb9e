"""Connect this backend to Label Studio projects (POST /api/ml), once: running it again changes nothing.

    python -m ml_backend connect --project 1 [--project 2 ...] [--url http://sam-backend:9090]
    python -m ml_backend connect --all            every project whose labeling config the backend can serve

Label Studio is reached at LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY (a legacy token or a personal access
token); --url is the backend URL *as Label Studio sees it* (default: $BACKEND_URL, else http://localhost:9090).
Label Studio then checks the backend's /health and /setup itself. A project already connected to this backend
under another spelling of the URL (127.0.0.1, localhost, the host's name, a trailing slash; recognised by the
instance id in /health, else by host, port and path: ml_backend/backend_match.py) is repaired, not connected again:
one ML backend and one webhook to this backend are kept, the duplicates deleted, and each finding is printed.
Label Studio refuses webhook URLs whose host has no dot (a docker-compose service name): connect then fails with
its reason and leaves nothing half made (ml_backend/project_webhook.py).
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
import re
import sys
from dataclasses import dataclass, field

from .backend_match import BackendMatcher, Endpoint
from .label_studio import ConnectError, HTTPFailure, LabelStudioClient
from .project_webhook import REFUSED_HINT, WebhookRefused, reconcile_webhook
from .settings import Settings

EXIT_FAILED = 2
DEFAULT_TITLE = "SAM (segment anything)"


def _check_config(project: dict) -> str | None:
    """Why the backend cannot serve this project's labeling config, or None when it can."""
    from .protocol import ProtocolError, parse_label_config

    try:
        parse_label_config(project.get("label_config") or "")
    except ProtocolError as exc:
        return str(exc)
    return None


@dataclass
class Connection:
    """A project's connection to this backend after `connect_project`: the ML backend kept (its id and its URL
    as Label Studio reaches it), "connected" or "already connected", and what was found and repaired."""

    ml_id: int
    ml_url: str
    outcome: str
    notes: list[str] = field(default_factory=list)


def _ml_backend_refused(exc: HTTPFailure, project_id: int, backend_url: str) -> ConnectError:
    hints = []
    text = str(exc).lower()
    if "not allowed" in text or "private network" in text or exc.status == 403:
        hints.append("Label Studio blocks private/loopback backend URLs unless it runs with "
                     "ML_BLOCK_LOCAL_IP=false (and SSRF_PROTECTION_ENABLED=false for the /webhook)")
    if "can't connect" in text or "health check" in text or "can't resolve" in text:
        hints.append(f"Label Studio could not reach {backend_url}: --url must be the backend's URL as seen "
                     "from the Label Studio server (in docker-compose: the backend service's URL)")
    if "setup" in text or "valid ml backend" in text:
        hints.append("the backend answered /setup with an error: see its log")
    if "401" in text or "unauthorized" in text:
        hints.append("the backend asks for credentials: run connect with the backend's BASIC_AUTH_USER and "
                     "BASIC_AUTH_PASS set")
    return ConnectError(f"Label Studio refused to connect project {project_id} to {backend_url}: {exc}"
                        + "".join(f"\n  hint: {h}" for h in hints))


def connect_project(ls: LabelStudioClient, project_id: int, backend_url: str, title: str,
                    interactive: bool, basic_auth: tuple[str, str] | None = None,
                    matcher: BackendMatcher | None = None) -> Connection:
    """Connect one project to this backend (with its basic auth, if any, for Label Studio's calls and the
    webhook), or repair the connection it has under any spelling of the URL (`BackendMatcher`): one ML backend
    and one webhook to this backend are kept, duplicates deleted, credentials set.

    A new connection makes the webhook first and the ML backend second, undoing the webhook if Label Studio
    refuses the ML backend: a refusal leaves nothing behind. Raises ConnectError (WebhookRefused when Label
    Studio refuses every webhook URL)."""
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
    matcher = matcher or BackendMatcher(backend_url)
    listed = ls.ml_backends(project_id)
    ours = [(ml, how) for ml in listed if (how := matcher.same(ml.get("url") or ""))]
    if not ours:
        return _connect_new(ls, project_id, backend_url, title, interactive, basic_auth, matcher,
                            [ml.get("url") or "" for ml in listed])
    wanted = Endpoint.parse(backend_url)
    ours.sort(key=lambda pair: (Endpoint.parse(pair[0]["url"]) != wanted, pair[0]["id"]))  # --url's, else oldest
    keep, how = ours[0]
    connection = Connection(int(keep["id"]), keep["url"], "already connected")
    if how != "the same URL":
        connection.notes.append(f"found ML backend {keep['id']} at {keep['url']}: {how} as {backend_url}")
    for ml, dup_how in ours[1:]:
        ls.delete_ml_backend(int(ml["id"]))
        connection.notes.append(f"removed duplicate ML backend {ml['id']} at {ml['url']} ({dup_how} as this backend)")
    if basic_auth or keep.get("auth_method") == "BASIC_AUTH":  # the password is write-only: always set it
        ls.set_ml_backend_auth(connection.ml_id, project_id, keep["url"], basic_auth)
        connection.notes.append("ML backend credentials " + ("set" if basic_auth else "removed"))
    try:
        others = [ml.get("url") or "" for ml in listed if all(ml is not dup for dup, _ in ours)]
        hooks = reconcile_webhook(ls, project_id, [keep["url"], backend_url], matcher, basic_auth,
                                  [keep["url"], *others])
    except WebhookRefused as exc:
        raise ConnectError(f"project {project_id}: ML backend {keep['id']} ({keep['url']}) stays connected "
                           f"(Retrieve predictions and the editor work), but {exc}.\n  hint: {REFUSED_HINT}") from None
    connection.notes += hooks.notes
    return connection


def _connect_new(ls: LabelStudioClient, project_id: int, backend_url: str, title: str, interactive: bool,
                 basic_auth: tuple[str, str] | None, matcher: BackendMatcher, ml_urls: list[str]) -> Connection:
    try:
        hooks = reconcile_webhook(ls, project_id, [backend_url], matcher, basic_auth, ml_urls)
    except WebhookRefused as exc:
        raise ConnectError(f"project {project_id}: nothing was connected: {exc}.\n  hint: {REFUSED_HINT}") from None
    try:
        created = ls.create_ml_backend(project_id, backend_url, title, interactive, basic_auth)
    except HTTPFailure as exc:
        if hooks.created is not None:  # no half-made connection: the webhook goes with the refused ML backend
            ls.delete_webhook(hooks.created)
        raise _ml_backend_refused(exc, project_id, backend_url) from None
    ml_url = created.get("url") or backend_url
    # Label Studio adds a webhook of its own unless one has exactly its URL: keep one
    again = reconcile_webhook(ls, project_id, [ml_url], matcher, basic_auth, [ml_url, *ml_urls])
    return Connection(int(created["id"]), ml_url, "connected", list(dict.fromkeys(hooks.notes + again.notes)))


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
    matcher = BackendMatcher(args.url)  # asks each backend URL's /health once, across projects
    for project_id in targets:
        try:
            connection = connect_project(ls, project_id, args.url, args.title, args.interactive, basic_auth, matcher)
        except ConnectError as exc:
            failures += 1
            print(f"error: {exc}", file=sys.stderr)
            continue
        print(f"project {project_id}: {connection.outcome} to {connection.ml_url} (ML backend id {connection.ml_id}"
              f"{', basic auth' if basic_auth else ''})" + "".join(f"\n  {note}" for note in connection.notes))
        if args.score_column:
            try:
                served = served_version(ls, project_id, connection.ml_id, connection.ml_url)
                print(f"project {project_id}: {ls.show_scores(project_id, served)}, "
                      f"{ensure_review_tab(ls, project_id)}")
            except ConnectError as exc:
                failures += 1
                print(f"error: {exc}", file=sys.stderr)
    return EXIT_FAILED if failures else 0
