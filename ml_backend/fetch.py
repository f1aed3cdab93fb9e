"""Fetch a Label Studio task image and decode it (trainer.images) into an RGB uint8 array.

Supported task URLs:

* relative Label Studio paths (``/data/upload/...``, ``/data/local-files/?d=...``, ...),
  fetched from ``label_studio_url`` with the API token;
* absolute ``http(s)`` URLs on the Label Studio origin (scheme, host, port), with the token;
* absolute ``http(s)`` URLs on a host of ``allowed_hosts`` (``ALLOWED_IMAGE_HOSTS``), without it;
* cloud storage URIs (``s3://``, ``gs://``, ``azure-blob://``), resolved through Label
  Studio's ``GET /tasks/<task_id>/presign/?fileuri=<urlsafe base64>`` (needs ``task_id``);
* ``data:...;base64,...`` URIs.

Anything else (``file://``, ``ftp://``, bare paths, any other host) is refused with
:class:`ImageError` before a connection is made.

Which hosts are fetched (SSRF policy):

* Host names are normalised first (:func:`normalize_host`): lower case, no trailing dot, IDNA,
  and any IPv4 spelling (``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``,
  ``[::ffff:127.0.0.1]``) as a dotted quad. URLs with ``user@`` credentials are refused.
* The Label Studio host (exact origin) is trusted: the operator configured it, and it is usually
  private or loopback. It is connected to normally (proxy settings included).
* An allow-listed host (``name``, ``name:port`` or ``*.example.com`` for subdomains) is resolved
  once; if ANY address it resolves to is loopback, private, CGNAT, link-local, multicast,
  reserved, unspecified or a cloud metadata address (also in IPv4-mapped/compatible, NAT64,
  6to4 or Teredo IPv6 form) it is refused (:func:`address_problem`), and the connection goes to
  the checked address itself (no second DNS lookup, so no DNS rebinding; TLS SNI and the
  certificate check still use the host name). ``allow_private`` (``ALLOW_PRIVATE_IMAGE_HOSTS``)
  lets allow-listed hosts be loopback/private/CGNAT/unique-local; link-local, metadata,
  multicast and reserved addresses stay refused.
* Redirects are checked hop by hop, before the next connection: Label Studio may redirect
  within its origin or to an allow-listed host; its storage resolvers (``/tasks/<id>/presign``,
  ``/resolve``) may also redirect to a signed URL on any host whose addresses are all public; an
  allow-listed host or signed URL may redirect only to the same host. Proxies are not used for
  hosts other than Label Studio's (a proxy would resolve the name itself).

The host rules themselves are in ml_backend/netpolicy.py; the token in ml_backend/api_token.py (one per
project, shared with its REST calls: ml_backend/label_studio.py's ProjectClient).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import numpy as np
import requests
from requests.adapters import HTTPAdapter

from trainer.images import MAX_PIXELS, decode_image

from .credentials import project_credentials
from .api_token import ApiToken, TokenError
from .netpolicy import (Refused, Url, checked_address, host_allowed, parse_allowed_hosts, parse_url, redact_url,
                        split_url)
from .settings import Settings

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
MAX_REDIRECTS = 5
_CHUNK = 64 * 1024
# LS storage resolvers: these (and only these) may redirect to another host (the signed URL).
_RESOLVER_PATH = re.compile(r"/(tasks|projects)/\d+/(presign|resolve)/?$")


class ImageError(Exception):
    """An image could not be loaded; ``url`` is the (redacted) task URL, ``reason`` why."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot load image {url}: {reason}")
        self.url = url
        self.reason = reason


@dataclass(frozen=True)
class ImageSource:
    """Where and how to fetch task images."""

    label_studio_url: str | None = None
    token: str | None = None  # legacy API token or personal access token (JWT refresh token)
    # hosts besides Label Studio's for plain http(s) URLs: "name", "name:port", "*.example.com";
    # empty = Label Studio's host only (plus public signed URLs its storage resolvers redirect to)
    allowed_hosts: tuple[str, ...] = ()
    timeout_s: float = 30.0  # total per load, redirects included
    max_pixels: int = MAX_PIXELS
    max_bytes: int = 100 * 1024 * 1024
    allow_private: bool = False  # allow-listed hosts may be loopback/private/CGNAT/unique-local


@dataclass(frozen=True)
class _Target:
    """One request the policy allowed: ``kind`` is "ls" (Label Studio, trusted), "allowed" (an
    allow-listed host) or "signed" (a public host a storage resolver redirected to)."""

    url: str
    parsed: Url
    kind: str
    address: str | None = None  # the checked address to connect to (not for "ls")
    resolver: bool = False  # a Label Studio storage resolver: may redirect to a signed URL


class _PinnedAdapter(HTTPAdapter):
    """Connects to the address the loader checked (``request.pinned_address``), never looking the
    name up again (no DNS rebinding); TLS SNI and the certificate check use the URL's host name."""

    def build_connection_pool_key_attributes(self, request, verify, cert=None):  # type: ignore[override]
        address = getattr(request, "pinned_address", None)
        if not address:
            raise ValueError("no checked address for this request")
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        if host_params["scheme"] == "https":
            pool_kwargs["server_hostname"] = request.pinned_host
        host_params["host"] = address
        return host_params, pool_kwargs

    def get_connection(self, url, proxies=None):  # requests < 2.32.2 would resolve the name again
        raise requests.exceptions.InvalidURL("pinned connections need requests >= 2.32.2")


class ImageFetcher:
    """Fetches and decodes task images; thread-safe (one requests.Session per thread).

    ``token``: the project's ApiToken when its REST calls share it (one token exchange), else its own.
    ValueError at construction if an ``allowed_hosts`` entry is invalid."""

    def __init__(self, source: ImageSource, token: ApiToken | None = None) -> None:
        self.source = source
        self._ls_url: str | None = None  # base URL (no user@), path prefix kept, no trailing slash
        self._ls_prefix = ""  # scheme://netloc of Label Studio, as configured
        self._ls: Url | None = None
        if source.label_studio_url:
            self._ls_url = source.label_studio_url.strip()
            try:
                parts = urlsplit(self._ls_url)
                self._ls_prefix = f"{parts.scheme.lower()}://{parts.netloc.rpartition('@')[2]}"
                self._ls_url = self._ls_prefix + parts.path.rstrip("/")
                self._ls = parse_url(self._ls_prefix + "/")
            except (ValueError, Refused):
                self._ls = None  # _require_ls says so
        self._allowed = parse_allowed_hosts(source.allowed_hosts)
        self._token = token or ApiToken(source.token)
        self._local = threading.local()
        self._sessions: list[requests.Session | HTTPAdapter] = []
        self._sessions_lock = threading.Lock()

    # ---- public -------------------------------------------------------------

    def load(self, url: str, task_id: int | None = None) -> np.ndarray:
        """Load ``url`` (a task's image value) as RGB uint8 ``(H, W, 3)``."""
        shown = redact_url(url) if isinstance(url, str) else repr(type(url))
        try:
            if not isinstance(url, str) or not url.strip():
                raise Refused("empty or non-string image URL")
            data = self._get_bytes(url.strip(), task_id)
            try:
                return decode_image(data, self.source.max_pixels)
            except ValueError as e:
                raise Refused(str(e)) from None
        except Refused as e:
            reason = str(e)
            if self.source.token:
                reason = reason.replace(self.source.token, "***")
            raise ImageError(shown, reason) from None

    def close(self) -> None:
        """Close all HTTP sessions and connection pools."""
        with self._sessions_lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()
        self._local = threading.local()

    # ---- URL dispatch -------------------------------------------------------

    def _get_bytes(self, url: str, task_id: int | None) -> bytes:
        parts = split_url(url)
        scheme = parts.scheme.lower()
        if scheme == "data":
            return self._data_uri(url)
        if scheme in CLOUD_SCHEMES:
            if not isinstance(task_id, int) or isinstance(task_id, bool):
                raise Refused(f"{scheme}:// URIs are resolved through Label Studio and need a task id")
            b64 = base64.urlsafe_b64encode(url.encode()).decode()
            return self._fetch(f"{self._require_ls()}/tasks/{task_id}/presign/?fileuri={quote(b64)}")
        if scheme in ("http", "https"):
            return self._fetch(url)
        if not scheme and not parts.netloc and url.startswith("/"):
            return self._fetch(self._require_ls() + url)
        raise Refused(f"unsupported URL scheme {scheme or '(none)'!r}")

    def _require_ls(self) -> str:
        if not self._ls_url:
            raise Refused("no Label Studio URL configured (LABEL_STUDIO_URL or /setup hostname)")
        if self._ls is None:
            raise Refused(f"the Label Studio URL {redact_url(self._ls_url)} is malformed")
        return self._ls_url

    def _target(self, url: str, previous: _Target | None = None) -> _Target:
        """Judge ``url`` (a task URL, or a redirect from ``previous``) before connecting to it."""
        try:
            parsed = parse_url(url)
        except Refused as e:
            if previous is None:
                raise
            raise Refused(f"redirect to unsupported URL {redact_url(url)} ({e})") from None
        shown = redact_url(url)
        if self._ls is not None and parsed.origin == self._ls.origin:
            if previous is not None and previous.kind != "ls":
                raise Refused(f"refusing redirect to another host ({shown})")
            return _Target(self._ls_prefix + parsed.path, parsed, "ls",
                           resolver=bool(_RESOLVER_PATH.search(urlsplit(parsed.path).path)))
        allowed = host_allowed(parsed, self._allowed)
        if previous is None:
            if not allowed:
                raise Refused(f"host {parsed.host!r} is not the Label Studio host and not in the allowed "
                               "hosts (ALLOWED_IMAGE_HOSTS)")
            kind = "allowed"
        elif previous.kind == "ls":
            if not allowed and not previous.resolver:
                raise Refused(f"refusing redirect to another host ({shown})")
            kind = "allowed" if allowed else "signed"
        else:  # an allow-listed host or a signed URL may redirect to the same host only
            if parsed.host != previous.parsed.host:
                raise Refused(f"refusing redirect to another host ({shown})")
            if previous.kind == "allowed" and not allowed:
                raise Refused(f"refusing redirect to {shown}: not in the allowed hosts")
            kind = "allowed" if allowed else previous.kind
        address = checked_address(parsed.host, parsed.port, kind == "allowed" and self.source.allow_private, kind)
        return _Target(f"{parsed.scheme}://{parsed.netloc}{parsed.path}", parsed, kind, address)

    def _data_uri(self, url: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise Refused("only base64 data: URIs are supported")
        if len(payload) * 3 // 4 > self.source.max_bytes:
            raise Refused(f"data URI larger than {self.source.max_bytes} bytes")
        try:
            return base64.b64decode(payload)
        except (binascii.Error, ValueError):
            raise Refused("invalid base64 in data URI") from None

    # ---- HTTP ---------------------------------------------------------------

    def _session(self) -> requests.Session:
        """Per thread: for Label Studio (trusted, connected to normally)."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def _pinned_adapter(self) -> _PinnedAdapter:
        """Per thread: for every other host, connected to at its checked address, without proxies."""
        adapter = getattr(self._local, "pinned", None)
        if adapter is None:
            adapter = _PinnedAdapter(max_retries=0)
            self._local.pinned = adapter
            with self._sessions_lock:
                self._sessions.append(adapter)
        return adapter

    def _fetch(self, url: str) -> bytes:
        """GET with manual redirects, each hop judged by :meth:`_target` before it is connected to."""
        deadline = time.monotonic() + self.source.timeout_s
        target = self._target(url)
        retried_auth = False
        hops = 0
        while True:
            is_ls = target.kind == "ls"
            headers = self._auth_headers(deadline) if is_ls else {}
            resp = self._get(target, deadline, headers)
            with resp:
                if resp.status_code == 401 and is_ls and self._token.refreshes and not retried_auth:
                    retried_auth = True
                    self._token.forget()
                    continue
                if resp.is_redirect:
                    hops += 1
                    if hops > MAX_REDIRECTS:
                        raise Refused(f"more than {MAX_REDIRECTS} redirects")
                    target = self._target(urljoin(target.url, resp.headers.get("Location", "")), target)
                    continue
                if resp.status_code >= 400:
                    raise Refused(self._http_error(resp.status_code, target.url, is_ls))
                return self._read(resp, deadline)

    def _get(self, target: _Target, deadline: float, headers: dict[str, str]) -> requests.Response:
        if target.kind == "ls":
            return self._request("GET", target.url, deadline, headers=headers, stream=True)
        request = requests.Request(
            "GET", target.url, headers={**requests.utils.default_headers(), **headers, "Host": target.parsed.netloc}
        ).prepare()
        request.pinned_address = target.address  # type: ignore[attr-defined]  # read by _PinnedAdapter
        request.pinned_host = target.parsed.host  # type: ignore[attr-defined]
        verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        return self._request("GET", target.url, deadline, send=lambda timeout: self._pinned_adapter().send(
            request, stream=True, timeout=timeout, verify=verify, proxies={}))

    def _request(self, method: str, url: str, deadline: float, send: Any = None, **kwargs: Any) -> requests.Response:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Refused(f"timed out after {self.source.timeout_s} s")
        try:
            if send is not None:
                return send(remaining)
            return self._session().request(
                method, url, timeout=remaining, allow_redirects=False, **kwargs
            )
        except requests.Timeout:
            raise Refused(f"timed out after {self.source.timeout_s} s ({redact_url(url)})") from None
        except requests.exceptions.SSLError:
            raise Refused(f"request to {redact_url(url)} failed (TLS certificate or handshake error)") from None
        except requests.RequestException as e:
            raise Refused(f"request to {redact_url(url)} failed ({type(e).__name__})") from None

    def _read(self, resp: requests.Response, deadline: float) -> bytes:
        limit = self.source.max_bytes
        length = resp.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limit:
            raise Refused(f"response is {length} bytes, more than the limit of {limit}")
        buf = bytearray()
        try:
            for chunk in resp.iter_content(_CHUNK):
                buf += chunk
                if len(buf) > limit:
                    raise Refused(f"response exceeds the limit of {limit} bytes")
                if time.monotonic() > deadline:
                    raise Refused(f"timed out after {self.source.timeout_s} s")
        except requests.RequestException as e:
            raise Refused(f"reading the response failed ({type(e).__name__})") from None
        return bytes(buf)

    @staticmethod
    def _http_error(status: int, url: str, is_ls: bool) -> str:
        msg = f"HTTP {status} from {redact_url(url)}"
        if is_ls and status == 403 and "/data/local-files" in url:
            msg += " (Label Studio serves local files only with LOCAL_FILES_SERVING_ENABLED=true)"
        elif is_ls and status in (401, 403):
            msg += " (check the Label Studio API token and its access to the project)"
        return msg

    # ---- Label Studio token -------------------------------------------------

    def _auth_headers(self, deadline: float) -> dict[str, str]:
        try:
            return self._token.headers(
                lambda path, body: self._request("POST", self._require_ls() + path, deadline, json=body))
        except TokenError as exc:
            raise Refused(str(exc)) from None


def image_source(settings: Settings, project: str | None,
                 allowed_hosts: tuple[str, ...] | None = None) -> ImageSource:
    """Where a project's task images come from: LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY, else what /setup
    told us (credentials.project_credentials), under the image settings (allowed hosts, limits)."""
    s = settings
    url, token = project_credentials(s, project)
    return ImageSource(
        label_studio_url=url,
        token=token,
        allowed_hosts=parse_allowed_hosts(s.allowed_image_hosts) if allowed_hosts is None else allowed_hosts,
        timeout_s=s.image_timeout_s, max_pixels=s.max_image_pixels, max_bytes=s.max_image_bytes,
        allow_private=s.allow_private_image_hosts,
    )
