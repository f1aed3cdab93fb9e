"""Which Label Studio URL and token a project's calls use, and the check of the configured key.

Two sources: LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY (the environment) and what Label Studio's /setup sent for a
project (its `hostname` and its creator's legacy token, kept under MODEL_DIR: `save_connection`). The
environment wins, except when its key is known to be rejected: then a project that has a /setup token uses it
(with LABEL_STUDIO_URL when set, the address the operator chose), so a wrong key in the environment does not
break projects that Label Studio itself connected.

"Known to be rejected": every backend worker (and the training worker) checks the configured key against
Label Studio at start, in the background (`check_at_start`: a log line, never a crash; Label Studio may come up
later, so it retries for a while), and records the verdict in MODEL_DIR/label_studio_key.json, where job and
command-line processes read it too. The file names the key by a short hash only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from trainer.files import write_atomic

from .api_token import ApiToken, TokenError, auth_hint
from .settings import Settings

log = logging.getLogger("ml_backend.label_studio")
WHOAMI_PATH = "/api/current-user/whoami"
VERDICT_FILE = "label_studio_key.json"  # under MODEL_DIR


@dataclass(frozen=True)
class KeyCheck:
    """state: "ok", "rejected" (Label Studio answered 401/403) or "unknown" (no answer, or not Label Studio's);
    retry: worth asking again (no answer yet, or a 5xx: Label Studio may still be starting)."""

    state: str
    reason: str = ""
    retry: bool = False


def check_key(url: str, token: str, timeout_s: float = 10.0) -> KeyCheck:
    """Ask Label Studio who `token` belongs to (a personal access token is exchanged first)."""
    base = url.rstrip("/")
    with requests.Session() as session:
        try:
            headers = ApiToken(token).headers(lambda path, body: session.post(base + path, json=body,
                                                                               timeout=timeout_s))
            resp = session.get(base + WHOAMI_PATH, headers=headers, timeout=timeout_s)
        except TokenError as exc:
            return KeyCheck("rejected", f"{exc}: {auth_hint(token, '')}")
        except requests.RequestException as exc:
            return KeyCheck("unknown", f"Label Studio at {base} did not answer ({type(exc).__name__})", retry=True)
    if resp.status_code == 200:
        return KeyCheck("ok")
    if resp.status_code in (401, 403):
        try:
            detail = str(resp.json().get("detail", ""))
        except (ValueError, AttributeError):
            detail = ""
        return KeyCheck("rejected", f"HTTP {resp.status_code} on {WHOAMI_PATH} ({detail or 'no detail'}): "
                                    f"{auth_hint(token, detail)}")
    return KeyCheck("unknown", f"HTTP {resp.status_code} on {base}{WHOAMI_PATH}: is LABEL_STUDIO_URL Label Studio?",
                    retry=resp.status_code >= 500)


def _key_id(settings: Settings) -> str:
    """A short hash naming the configured URL and key in the verdict file (not the key)."""
    raw = f"{(settings.label_studio_url or '').rstrip('/')}\n{settings.label_studio_api_key or ''}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _verdict_path(settings: Settings) -> Path:
    return settings.model_dir / VERDICT_FILE


def record(settings: Settings, check: KeyCheck) -> None:
    """Keep a verdict ("ok" or "rejected") on the configured key for every process sharing MODEL_DIR."""
    body = json.dumps({"key": _key_id(settings), "state": check.state, "reason": check.reason, "at": time.time()})
    settings.model_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(_verdict_path(settings), lambda tmp: tmp.write_text(body))


def configured_key_rejected(settings: Settings) -> bool:
    """Whether the last check of LABEL_STUDIO_API_KEY (for this URL) found it rejected."""
    try:
        verdict = json.loads(_verdict_path(settings).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(verdict, dict) and verdict.get("key") == _key_id(settings) and verdict.get("state") == "rejected"


def save_connection(settings: Settings, project: str, hostname: str | None, access_token: str | None) -> None:
    """Remember the Label Studio hostname and token /setup sent for a project (0600, written atomically)."""
    path = connection_path(settings, project)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"hostname": hostname, "access_token": access_token})
    write_atomic(path, lambda tmp: tmp.write_text(body), mode=0o600)


def connection_path(settings: Settings, project: str) -> Path | None:
    """Where /setup's Label Studio hostname and token for a project are kept (0600)."""
    from trainer.registry import PROJECT_NAME  # here: the registry loads torch, which `connect` does not need

    if not PROJECT_NAME.match(project):
        return None
    return settings.model_dir / "projects" / project / "connection.json"


def saved_connection(settings: Settings, project: str | None) -> dict:
    path = connection_path(settings, project) if project else None
    try:
        return json.loads(path.read_text()) if path else {}
    except (OSError, json.JSONDecodeError):
        return {}


def project_credentials(settings: Settings, project: str | None) -> tuple[str | None, str | None]:
    """(Label Studio URL, token) for a project's calls: the environment's, else what /setup sent; /setup's token
    also when the environment's key is known to be rejected."""
    url, key = settings.label_studio_url, settings.label_studio_api_key
    if url and key:
        if project and configured_key_rejected(settings):
            token = saved_connection(settings, project).get("access_token")
            if token:
                return url, token
        return url, key
    connection = saved_connection(settings, project)
    return url or connection.get("hostname"), key or connection.get("access_token")


def check_and_log(settings: Settings, attempts: int = 12, retry_s: float = 10.0) -> KeyCheck:
    """Check the configured key, retrying while Label Studio does not answer (it may start after us); log the
    verdict as one line and record it. Bounded: `attempts` tries, `retry_s` apart, while there is no answer."""
    check = KeyCheck("unknown", "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are not both set")
    if not (settings.label_studio_url and settings.label_studio_api_key):
        log.info("label studio key not checked", extra={"reason": check.reason})
        return check
    for attempt in range(max(1, attempts)):
        if attempt:
            time.sleep(retry_s)
        check = check_key(settings.label_studio_url, settings.label_studio_api_key)
        if not check.retry:
            break
    where = {"label_studio_url": settings.label_studio_url}
    if check.state == "ok":
        log.info("label studio key ok", extra=where)
    elif check.state == "rejected":
        log.error("LABEL_STUDIO_API_KEY rejected by Label Studio; projects connected in Label Studio use the token "
                  "their /setup sent instead", extra={**where, "reason": check.reason})
    else:
        log.warning("label studio key not checked", extra={**where, "reason": check.reason})
    if check.state != "unknown":
        try:
            record(settings, check)
        except OSError as exc:
            log.warning("label studio key verdict not recorded", extra={"error": str(exc)})
    return check


def check_at_start(settings: Settings) -> threading.Thread | None:
    """Check the configured key in the background (serving must not wait for Label Studio)."""
    if not (settings.label_studio_url and settings.label_studio_api_key):
        return None
    thread = threading.Thread(target=check_and_log, args=(settings,), name="label-studio-key-check", daemon=True)
    thread.start()
    return thread
