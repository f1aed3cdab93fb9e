"""Connect this backend to Label Studio projects (POST /api/ml), once: running it again changes nothing.

    python -m ml_backend connect --project 1 [--project 2 ...] [--url http://sam-backend:9090]
    python -m ml_backend connect --all            every project whose labeling config the backend can serve

Label Studio is reached at LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY (a legacy token or a personal access
token); --url is the backend URL *as Label Studio sees it* (default: $BACKEND_URL, else http://localhost:9090).
Label Studio then checks the backend's /health and /setup itself and creates the project's /webhook.
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
    return EXIT_FAILED if failures else 0
