"""Label Studio as the backend reaches it: its API token (exchanged once, here) and the per-project
connections /setup tells us about."""
from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import requests

from trainer.files import write_atomic
from trainer.registry import PROJECT_NAME

from .settings import Settings

TOKEN_REFRESH_PATH = "/api/token/refresh/"  # LS 1.23 route; note the trailing slash
_REFRESH_MARGIN_S = 30.0  # refresh an access token this long before it expires


class TokenError(Exception):
    """Label Studio would not exchange the token; the message says why (never contains the token)."""


def jwt_claims(token: str) -> dict[str, Any] | None:
    """Claims of a JWT (unverified), or None if ``token`` is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    return payload if isinstance(payload, dict) else None



class ApiToken:
    """LABEL_STUDIO_API_KEY as request headers, for every client of Label Studio (connect, image fetching).

    A legacy token is sent as ``Token <key>``, an access JWT as ``Bearer``; a personal access token (a JWT
    refresh token) is exchanged at TOKEN_REFRESH_PATH for a short-lived access token, cached until shortly
    before it expires (thread-safe). ``post(path, body) -> requests.Response`` sends the exchange with the
    caller's own transport (its timeouts, its connection rules).
    """

    def __init__(self, token: str | None) -> None:
        self.token = token
        self.claims = jwt_claims(token) if token else None
        self._lock = threading.Lock()
        self._access: str | None = None
        self._access_exp = 0.0

    @property
    def refreshes(self) -> bool:
        """A personal access token: its access tokens expire, and a 401 may mean "refresh and retry"."""
        return self.claims is not None and self.claims.get("token_type") != "access"

    def headers(self, post: Callable[[str, dict], requests.Response]) -> dict[str, str]:
        if not self.token:
            return {}
        if self.claims is None:
            return {"Authorization": f"Token {self.token}"}
        if not self.refreshes:
            return {"Authorization": f"Bearer {self.token}"}
        return {"Authorization": f"Bearer {self._access_token(post)}"}

    def forget(self) -> None:
        """Drop the cached access token (after a 401): the next headers() exchanges again."""
        with self._lock:
            self._access = None

    def _access_token(self, post: Callable[[str, dict], requests.Response]) -> str:
        with self._lock:
            if self._access and time.time() < self._access_exp - _REFRESH_MARGIN_S:
                return self._access
            with post(TOKEN_REFRESH_PATH, {"refresh": self.token}) as resp:
                status = resp.status_code
                try:
                    body = resp.json()
                except ValueError:
                    body = None
            if status != 200:
                exp = (self.claims or {}).get("exp")
                expired = isinstance(exp, (int, float)) and exp < time.time()
                hint = " (the personal access token has expired)" if expired else ""
                raise TokenError(f"Label Studio token refresh failed: HTTP {status}{hint}")
            access = body.get("access") if isinstance(body, dict) else None
            if not isinstance(access, str) or not access:
                raise TokenError("Label Studio token refresh returned no access token")
            exp = (jwt_claims(access) or {}).get("exp")
            self._access = access
            self._access_exp = float(exp) if isinstance(exp, (int, float)) else time.time() + 300
            return access




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
    if not PROJECT_NAME.match(project):
        return None
    return settings.model_dir / "projects" / project / "connection.json"


def saved_connection(settings: Settings, project: str | None) -> dict:
    path = connection_path(settings, project) if project else None
    try:
        return json.loads(path.read_text()) if path else {}
    except (OSError, json.JSONDecodeError):
        return {}


# -- label-studio-sdk where it covers the call ---------------------------------------------------------------
def export_project(url: str, token: str | None, project_id: int) -> tuple[str, list[dict]]:
    """A project's label config and its JSON export (annotated tasks), through label-studio-sdk (which takes
    either token kind). Raises the SDK's errors."""
    from label_studio_sdk import LabelStudio

    client = LabelStudio(base_url=url, api_key=token)
    project = client.projects.get(id=project_id)
    chunks = client.projects.exports.download_sync(id=project_id, export_type="JSON")
    return project.label_config or "", json.loads(b"".join(chunks))


# -- the REST client (connect) ----------------------------------------------------------------------------
class ConnectError(Exception):
    """A failure with a message meant for the user."""


class HTTPFailure(ConnectError):
    """Label Studio answered with an HTTP error."""

    def __init__(self, status: int, path: str, message: str) -> None:
        super().__init__(f"HTTP {status} on {path}: {message}")
        self.status = status


def _error_text(body: Any) -> str:
    """Label Studio's error message (an API error's body), without HTML."""
    if isinstance(body, dict):
        detail = body.get("validation_errors") or body.get("detail") or body
        text = json.dumps(detail) if not isinstance(detail, str) else detail
    else:
        text = body if isinstance(body, str) else json.dumps(body, default=str)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("\\n", " ").replace("\\\"", "\"")
    return " ".join(text.split())[:1500]


def _auth_fields(basic_auth: tuple[str, str] | None) -> dict:
    """Label Studio's ML backend auth fields: its "Use basic auth" with these credentials, or none."""
    if basic_auth is None:
        return {"auth_method": "NONE", "basic_auth_user": "", "basic_auth_pass": ""}
    return {"auth_method": "BASIC_AUTH", "basic_auth_user": basic_auth[0], "basic_auth_pass": basic_auth[1]}


class LabelStudioClient:
    """The calls `connect` makes, through label-studio-sdk (which takes either token kind and exchanges a
    personal access token itself); every failure is a ConnectError whose message says what to fix."""

    def __init__(self, url: str, token: str, timeout_s: float = 30.0) -> None:
        from label_studio_sdk import LabelStudio

        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.sdk = LabelStudio(base_url=self.url, api_key=token, timeout=timeout_s)

    def _call(self, path: str, fn: Callable[[], Any]) -> Any:
        """Run one SDK call; `path` names the API route in messages. Models come back as dicts."""
        import httpx
        from label_studio_sdk.core.api_error import ApiError

        try:
            result = fn()
        except ApiError as exc:
            if exc.status_code == 401:
                hint = ("legacy tokens need LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true on Label Studio"
                        if jwt_claims(self.token) is None
                        else "the personal access token may have expired or been revoked")
                raise ConnectError(f"Label Studio rejected LABEL_STUDIO_API_KEY (HTTP 401 on {path}): {hint}") from None
            if exc.status_code and exc.status_code < 400:  # answered, but not with the API's JSON
                raise ConnectError(f"{self.url}{path} did not answer as Label Studio's API (HTTP {exc.status_code}): "
                                   f"is {self.url} Label Studio's URL?") from None
            raise HTTPFailure(exc.status_code or 0, path, _error_text(exc.body)) from None
        except httpx.HTTPError as exc:
            raise ConnectError(f"cannot reach Label Studio at {self.url}: {exc}") from None
        except ValueError as exc:  # JSON or model parsing of something that is not Label Studio's API
            raise ConnectError(f"{self.url}{path} did not answer as Label Studio's API ({type(exc).__name__}): "
                               f"is {self.url} Label Studio's URL?") from None
        if isinstance(result, list):
            return [item.model_dump() if hasattr(item, "model_dump") else item for item in result]
        return result.model_dump() if hasattr(result, "model_dump") else result

    def whoami(self) -> dict:
        return self._call("/api/current-user/whoami", self.sdk.users.whoami)

    def project(self, project_id: int) -> dict:
        return self._call(f"/api/projects/{project_id}", lambda: self.sdk.projects.get(id=project_id))

    def projects(self) -> list[dict]:
        return self._call("/api/projects", lambda: list(self.sdk.projects.list(page_size=100)))

    def tasks(self, project_id: int, page_size: int = 100, fields: str = "task_only") -> Iterator[list[dict]]:
        """The project's tasks, a page at a time: id, data, ... ("task_only") or with their annotations and
        predictions ("all")."""
        path = f"/api/tasks?project={project_id}"
        page = self._call(path, lambda: self.sdk.tasks.list(project=project_id, fields=fields, page_size=page_size))
        while page is not None:
            items = [t.model_dump() if hasattr(t, "model_dump") else t for t in page.items or []]
            if not items:
                return
            yield items
            if not page.has_next:
                return
            try:
                page = self._call(path, page.next_page)
            except HTTPFailure as exc:
                if exc.status == 404:  # Label Studio's answer past the last page ("Invalid page.")
                    return
                raise

    def import_predictions(self, project_id: int, predictions: list[dict]) -> dict:
        """Store predictions ({task, result, score, model_version}) in one call."""
        return self._call(f"/api/projects/{project_id}/import/predictions",
                          lambda: self.sdk.projects.import_predictions(id=project_id, request=predictions))

    def ml_backends(self, project_id: int) -> list[dict]:
        return self._call("/api/ml", lambda: self.sdk.ml.list(project=project_id))

    def create_ml_backend(self, project_id: int, url: str, title: str, interactive: bool,
                          basic_auth: tuple[str, str] | None = None) -> dict:
        return self._call("/api/ml", lambda: self.sdk.ml.create(project=project_id, url=url, title=title,
                                                                  is_interactive=interactive,
                                                                  **(_auth_fields(basic_auth) if basic_auth else {})))

    def set_ml_backend_auth(self, ml_id: int, project_id: int, url: str, basic_auth: tuple[str, str] | None) -> dict:
        """Label Studio checks the connection again (its /health and /setup) on every update: it needs the URL
        and the project with the credentials."""
        return self._call(f"/api/ml/{ml_id}", lambda: self.sdk.ml.update(id=ml_id, project=project_id, url=url,
                                                                        **_auth_fields(basic_auth)))

    def refresh_ml_backend(self, ml_id: int, project_id: int, url: str) -> dict:
        """Have Label Studio ask the backend's /setup again (an update re-validates); returns the ML backend
        record with the model_version the backend now serves."""
        self._call(f"/api/ml/{ml_id}", lambda: self.sdk.ml.update(id=ml_id, project=project_id, url=url))
        return self._call(f"/api/ml/{ml_id}", lambda: self.sdk.ml.get(id=ml_id))

    def set_project_model_version(self, project_id: int, model_version: str) -> dict:
        """The project's model version: the predictions Label Studio shows and scores (Data Manager's
        "Prediction score" averages only predictions of this version)."""
        return self._call(f"/api/projects/{project_id}",
                          lambda: self.sdk.projects.update(id=project_id, model_version=model_version))

    def views(self, project_id: int) -> list[dict]:
        """The project's Data Manager tabs."""
        return self._call("/api/dm/views", lambda: self.sdk.views.list(project=project_id))

    def create_view(self, project_id: int, data: dict) -> dict:
        """A Data Manager tab: data holds its title, ordering, filters and hidden columns."""
        return self._call("/api/dm/views", lambda: self.sdk.views.create(project=project_id, data=data))

    def webhooks(self, project_id: int) -> list[dict]:
        return self._call("/api/webhooks", lambda: self.sdk.webhooks.list(project=str(project_id)))

    def set_webhook_headers(self, webhook_id: int, headers: dict[str, str]) -> dict:
        return self._call(f"/api/webhooks/{webhook_id}", lambda: self.sdk.webhooks.update(id=webhook_id,
                                                                                           headers=headers))

    def create_webhook(self, project_id: int, url: str, headers: dict[str, str]) -> dict:
        return self._call("/api/webhooks", lambda: self.sdk.webhooks.create(
            project=project_id, url=url, send_payload=True, send_for_all_actions=True, headers=headers))

    def wait_healthy(self, seconds: float) -> None:
        """Poll Label Studio's /health (not an API call: the SDK has none) for up to `seconds`."""
        deadline = time.monotonic() + seconds
        last = "no answer"
        while True:
            try:
                resp = requests.get(self.url + "/health", timeout=5)
                if resp.status_code == 200:
                    return
                last = f"HTTP {resp.status_code}"
            except requests.RequestException as exc:
                last = str(exc)
            if time.monotonic() >= deadline:
                raise ConnectError(f"Label Studio at {self.url} not healthy within {seconds:.0f} s ({last})")
            time.sleep(2)
