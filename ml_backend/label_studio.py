"""Label Studio as the backend reaches it: `for_project(settings, project)` gives a project's one client
(`ProjectClient`): the URL and token `credentials.project_credentials` chose, one ApiToken (one token exchange)
behind both its image fetcher and its REST calls (label-studio-sdk, `LabelStudioClient`). Predict, pre-warm,
pre-label, training and `connect` all go through it.
"""
from __future__ import annotations

import json
import re
import threading
import time
from typing import Any, Callable, Iterator

import httpx
import requests

from .api_token import ApiToken, TokenError, auth_hint
from .credentials import connection_path, save_connection, saved_connection  # noqa: F401  (re-exported)
from .fetch import ImageFetcher, ImageSource, image_source
from .settings import Settings


# -- the REST client --------------------------------------------------------------------------------------
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


class _SharedToken(httpx.Auth):
    """The SDK's requests authorised with the project's ApiToken (so images and REST share one token exchange);
    a 401 to a personal access token's access token is retried once with a fresh exchange."""

    def __init__(self, url: str, token: ApiToken, timeout_s: float) -> None:
        self.url, self.token, self.timeout_s = url, token, timeout_s

    def _headers(self) -> dict[str, str]:
        return self.token.headers(lambda path, body: requests.post(self.url + path, json=body, timeout=self.timeout_s))

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        request.headers.update(self._headers())
        response = yield request
        if response.status_code == 401 and self.token.refreshes:
            self.token.forget()
            request.headers.update(self._headers())
            yield request


class LabelStudioClient:
    """Label Studio's REST API through label-studio-sdk, authorised with an ApiToken (a project's shared one, or
    its own); every failure is a ConnectError whose message says what to fix."""

    def __init__(self, url: str, token: str, timeout_s: float = 30.0, api_token: ApiToken | None = None) -> None:
        from label_studio_sdk import LabelStudio

        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.api_token = api_token or ApiToken(token)
        http = httpx.Client(auth=_SharedToken(self.url, self.api_token, timeout_s), timeout=timeout_s,
                            follow_redirects=True)
        # the SDK's own header ("Token <placeholder>") is replaced by _SharedToken on every request
        self.sdk = LabelStudio(base_url=self.url, api_key="set-by-the-shared-token", httpx_client=http,
                               timeout=timeout_s)

    def _call(self, path: str, fn: Callable[[], Any]) -> Any:
        """Run one SDK call; `path` names the API route in messages. Models come back as dicts."""
        from label_studio_sdk.core.api_error import ApiError

        try:
            result = fn()
        except TokenError as exc:  # a personal access token Label Studio would not exchange
            raise ConnectError(f"Label Studio rejected LABEL_STUDIO_API_KEY ({exc}): {auth_hint(self.token, '')}") \
                from None
        except ApiError as exc:
            if exc.status_code == 401:
                hint = auth_hint(self.token, _error_text(exc.body))
                raise ConnectError(f"Label Studio rejected LABEL_STUDIO_API_KEY (HTTP 401 on {path}): {hint}") from None
            if exc.status_code and exc.status_code < 400:  # answered, but not with the API's JSON
                raise ConnectError(f"{self.url}{path} did not answer as Label Studio's API (HTTP {exc.status_code}): "
                                   f"is {self.url} Label Studio's URL?") from None
            raise HTTPFailure(exc.status_code or 0, path, _error_text(exc.body)) from None
        except (httpx.HTTPError, requests.RequestException) as exc:
            raise ConnectError(f"cannot reach Label Studio at {self.url}: {exc}") from None
        except ValueError as exc:  # JSON or model parsing of something that is not Label Studio's API
            raise ConnectError(f"{self.url}{path} did not answer as Label Studio's API ({type(exc).__name__}): "
                               f"is {self.url} Label Studio's URL?") from None
        if isinstance(result, list):
            return [item.model_dump() if hasattr(item, "model_dump") else item for item in result]
        return result.model_dump() if hasattr(result, "model_dump") else result

    def export(self, project_id: int) -> tuple[str, list[dict]]:
        """The project's label config and its JSON export (annotated tasks)."""
        path = f"/api/projects/{project_id}/exports"
        config = self.project(project_id).get("label_config") or ""
        chunks = self._call(path, lambda: b"".join(self.sdk.projects.exports.download_sync(id=project_id,
                                                                                            export_type="JSON")))
        try:
            return config, json.loads(chunks)
        except ValueError:
            raise ConnectError(f"{self.url}{path}: the export is not JSON") from None

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

    def delete_ml_backend(self, ml_id: int) -> None:
        self._call(f"/api/ml/{ml_id}", lambda: self.sdk.ml.delete(id=ml_id))

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

    def delete_webhook(self, webhook_id: int) -> None:
        self._call(f"/api/webhooks/{webhook_id}", lambda: self.sdk.webhooks.delete(id=webhook_id))

    def delete_prediction(self, prediction_id: int) -> None:
        self._call(f"/api/predictions/{prediction_id}", lambda: self.sdk.predictions.delete(id=prediction_id))

    def show_scores(self, project_id: int, served: str) -> str:
        """Point the project's model version at `served` (the version the backend serves), so that the Data
        Manager's "Prediction score" column (it averages only predictions of the project's model version) shows
        the backend's scores; returns what was done. Label Studio accepts a version only once the project holds
        predictions of it: until then ConnectError says what to run first."""
        current = self.project(project_id).get("model_version")
        if current == served:
            return f"model version {served} (Data Manager's Prediction score column)"
        try:
            self.set_project_model_version(project_id, served)
        except HTTPFailure as exc:
            if exc.status != 400:
                raise
            raise ConnectError(f"project {project_id} has no predictions of {served} yet, so Label Studio refuses "
                               f"it as the project's model version: run Retrieve predictions in the Data Manager (or "
                               f"`python -m ml_backend prelabel --project {project_id}`), then this again") from None
        return f"model version {current!r} -> {served} (Data Manager's Prediction score column)"

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


# -- one project's client ---------------------------------------------------------------------------------
class ProjectClient:
    """Label Studio as one project's calls reach it: `images` (task images, SSRF-checked: ml_backend/fetch.py)
    and `api` (REST, label-studio-sdk) share one ApiToken, so a personal access token is exchanged once for both.
    `connected` is False when neither the environment nor /setup gave a URL and a token."""

    def __init__(self, source: ImageSource, project: str | None = None) -> None:
        self.source = source
        self.project = project
        self.token = ApiToken(source.token)
        self.images = ImageFetcher(source, self.token)
        self._api: LabelStudioClient | None = None
        self._lock = threading.Lock()

    @property
    def connected(self) -> bool:
        return bool(self.source.label_studio_url and self.source.token)

    def require(self) -> None:
        """ConnectError naming what to set when the project has no Label Studio URL/token."""
        if not self.connected:
            raise ConnectError(f"project {self.project}: no Label Studio URL/token (set LABEL_STUDIO_URL and "
                               "LABEL_STUDIO_API_KEY, or connect the project so /setup provides them)")

    @property
    def api(self) -> LabelStudioClient:
        self.require()
        with self._lock:
            if self._api is None:
                self._api = LabelStudioClient(self.source.label_studio_url, self.source.token,
                                              timeout_s=max(30.0, self.source.timeout_s), api_token=self.token)
            return self._api

    @property
    def project_id(self) -> int:
        if self.project is None or not self.project.isdigit():
            raise ConnectError(f"project {self.project!r} is not a Label Studio project id")
        return int(self.project)

    def label_config(self) -> str:
        return self.api.project(self.project_id).get("label_config") or ""

    def tasks(self, fields: str = "task_only") -> Iterator[list[dict]]:
        return self.api.tasks(self.project_id, fields=fields)

    def task_images(self) -> Iterator[tuple[int, list]]:
        """The project's tasks a page at a time: (tasks listed, the protocol.ImageRef of those that name one)."""
        from .protocol import image_refs, parse_label_config  # here: `connect` needs no torch

        config = parse_label_config(self.label_config())
        for page in self.tasks():
            yield len(page), image_refs(page, config)

    def export(self) -> tuple[str, list[dict]]:
        return self.api.export(self.project_id)

    def follow_served_version(self, served: str) -> str:
        """Keep the Data Manager's score column on the served version: if the project's model version is another
        version of this base model (someone chose to show its scores), move it to `served`; returns what was
        done. Never raises: it runs after a promotion and after pre-labelling, which stand whether or not it
        works."""
        try:
            if not self.connected:
                return "no Label Studio URL/token"
            current = self.api.project(self.project_id).get("model_version") or ""
            if current == served or current.split("@")[0] != served.split("@")[0]:
                return f"project model version {current!r}: left as it is"
            return self.api.show_scores(self.project_id, served)
        except (ConnectError, ValueError, OSError) as exc:
            return f"not moved: {exc}"

    def close(self) -> None:
        self.images.close()


def for_project(settings: Settings, project: str | None, allowed_hosts: tuple[str, ...] | None = None) -> ProjectClient:
    """The project's client: LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY, else what /setup sent
    (credentials.project_credentials), under the image settings."""
    return ProjectClient(image_source(settings, project, allowed_hosts), project)
