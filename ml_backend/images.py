"""Load a Label Studio task image into an RGB uint8 array, as Label Studio displays it.

Supported task URLs:

* relative Label Studio paths (``/data/upload/...``, ``/data/local-files/?d=...``, ...),
  fetched from ``label_studio_url`` with the API token;
* absolute ``http(s)`` URLs: the token is sent only when the URL has the exact origin
  (scheme, host, port) of ``label_studio_url``;
* cloud storage URIs (``s3://``, ``gs://``, ``azure-blob://``), resolved through Label
  Studio's ``GET /tasks/<task_id>/presign/?fileuri=<urlsafe base64>`` (needs ``task_id``);
* ``data:...;base64,...`` URIs.

Anything else (``file://``, ``ftp://``, bare paths) is refused with :class:`ImageError`.

Decoding: EXIF orientation is applied; transparent images are composited onto white
(what a browser shows on a white page); 16-bit / 32-bit grayscale is min-max scaled to
0..255; everything ends up as ``np.uint8`` of shape ``(H, W, 3)``.

Pixel limits: the size is checked right after ``Image.open`` (which reads only the header),
before any decoding. Pillow's own limit (``Image.MAX_IMAGE_PIXELS``, ~89.5 M pixels by
default) also caps ``max_pixels``. Importing this module turns Pillow's
``DecompressionBombWarning`` into an error process-wide (as Pillow's docs suggest); the
explicit check does not depend on that filter (pytest or any ``catch_warnings`` may reset it).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urljoin, urlsplit

import numpy as np
import requests
from PIL import Image, ImageOps

warnings.simplefilter("error", Image.DecompressionBombWarning)

CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
MAX_REDIRECTS = 5
TOKEN_REFRESH_PATH = "/api/token/refresh/"  # LS 1.23 route; note the trailing slash
_REFRESH_MARGIN_S = 30.0  # refresh an access token this long before it expires
_CHUNK = 64 * 1024
# LS storage resolvers: these (and only these) may redirect to another host (the signed URL).
_RESOLVER_PATH = re.compile(r"/(tasks|projects)/\d+/(presign|resolve)/?$")
_SAFE_QUERY_KEYS = {"d", "fileuri"}


class ImageError(Exception):
    """An image could not be loaded; ``url`` is the (redacted) task URL, ``reason`` why."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot load image {url}: {reason}")
        self.url = url
        self.reason = reason


class _Failure(Exception):
    """Internal: a reason, turned into an ImageError (with the URL) by ImageLoader.load."""


@dataclass(frozen=True)
class ImageSource:
    """Where and how to fetch task images."""

    label_studio_url: str | None = None
    token: str | None = None  # legacy API token or personal access token (JWT refresh token)
    allowed_hosts: tuple[str, ...] = ()  # extra hosts for plain http(s) URLs; empty = any host
    timeout_s: float = 30.0  # total per load, redirects included
    max_pixels: int = 50_000_000
    max_bytes: int = 100 * 1024 * 1024


def redact_url(url: str) -> str:
    """A URL safe to show in messages: no userinfo, no fragment, query values masked."""
    if url.startswith("data:"):
        return url.split(",", 1)[0] + ",..."
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "<malformed URL>"
    shown = f"{parts.scheme}://{host}{parts.path}" if parts.scheme else parts.path
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        masked = [(k, v if k in _SAFE_QUERY_KEYS else "***") for k, v in pairs]
        shown += "?" + urlencode(masked, quote_via=quote, safe="*/")
    return shown if len(shown) <= 300 else shown[:297] + "..."


def _origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL; a malformed one matches nothing."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        return "", "", -1
    return scheme, (parts.hostname or "").lower(), port


def _jwt_claims(token: str) -> dict[str, Any] | None:
    """Claims of a JWT (unverified), or None if ``token`` is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    return payload if isinstance(payload, dict) else None


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode image bytes to RGB uint8 ``(H, W, 3)``; raises ValueError with a reason."""
    try:
        im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"image too large ({e})") from None
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError, ...
        raise ValueError(f"not a recognizable image ({type(e).__name__})") from None
    width, height = im.size
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    if width * height > limit:
        raise ValueError(f"image too large: {width}x{height} pixels, more than the limit of {limit}")
    if width == 0 or height == 0:
        raise ValueError("image is empty")
    try:
        im.load()
    except Exception as e:
        raise ValueError(f"corrupt image data ({type(e).__name__}: {e})") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:
        pass  # malformed EXIF: browsers ignore it too, so show the image as stored
    try:
        return _to_rgb(im)
    except Exception as e:
        raise ValueError(f"unsupported image mode {im.mode!r} ({type(e).__name__}: {e})") from None


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to RGB uint8; alpha is composited onto white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.nan_to_num(np.asarray(im).astype(np.float32))
        lo, hi = float(a.min()), float(a.max())
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        gray = np.rint(scaled).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode == "1":
        im = im.convert("L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), rgba)
    return np.array(im.convert("RGB"), dtype=np.uint8)


class ImageLoader:
    """Fetches and decodes task images; thread-safe (one requests.Session per thread)."""

    def __init__(self, source: ImageSource) -> None:
        self.source = source
        self._ls_url = source.label_studio_url.rstrip("/") if source.label_studio_url else None
        self._ls_origin = _origin(self._ls_url) if self._ls_url else None
        self._allowed = {h.lower() for h in source.allowed_hosts}
        self._claims = _jwt_claims(source.token) if source.token else None
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()
        self._token_lock = threading.Lock()
        self._access: str | None = None
        self._access_exp = 0.0

    # ---- public -------------------------------------------------------------

    def load(self, url: str, task_id: int | None = None) -> np.ndarray:
        """Load ``url`` (a task's image value) as RGB uint8 ``(H, W, 3)``."""
        shown = redact_url(url) if isinstance(url, str) else repr(type(url))
        try:
            if not isinstance(url, str) or not url.strip():
                raise _Failure("empty or non-string image URL")
            data = self._get_bytes(url.strip(), task_id)
            try:
                return decode_image(data, self.source.max_pixels)
            except ValueError as e:
                raise _Failure(str(e)) from None
        except _Failure as e:
            reason = str(e)
            if self.source.token:
                reason = reason.replace(self.source.token, "***")
            raise ImageError(shown, reason) from None

    def close(self) -> None:
        """Close all HTTP sessions."""
        with self._sessions_lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()
        self._local = threading.local()

    # ---- URL dispatch -------------------------------------------------------

    def _get_bytes(self, url: str, task_id: int | None) -> bytes:
        try:
            parts = urlsplit(url)
            _ = parts.port  # raises ValueError on a bad port
        except ValueError:
            raise _Failure("malformed URL") from None
        scheme = parts.scheme.lower()
        if scheme == "data":
            return self._data_uri(url)
        if scheme in CLOUD_SCHEMES:
            if not isinstance(task_id, int) or isinstance(task_id, bool):
                raise _Failure(f"{scheme}:// URIs are resolved through Label Studio and need a task id")
            b64 = base64.urlsafe_b64encode(url.encode()).decode()
            return self._fetch(f"{self._require_ls()}/tasks/{task_id}/presign/?fileuri={quote(b64)}")
        if scheme in ("http", "https"):
            if not parts.hostname:
                raise _Failure("URL has no host")
            if not self._is_ls(url) and self._allowed and not self._host_allowed(url):
                raise _Failure(f"host {parts.hostname!r} is not in the allowed hosts")
            return self._fetch(url)
        if not scheme and not parts.netloc and url.startswith("/"):
            return self._fetch(self._require_ls() + url)
        raise _Failure(f"unsupported URL scheme {scheme or '(none)'!r}")

    def _require_ls(self) -> str:
        if not self._ls_url:
            raise _Failure("no Label Studio URL configured (LABEL_STUDIO_URL or /setup hostname)")
        return self._ls_url

    def _is_ls(self, url: str) -> bool:
        return self._ls_origin is not None and _origin(url) == self._ls_origin

    def _host_allowed(self, url: str) -> bool:
        _, host, port = _origin(url)
        return host in self._allowed or f"{host}:{port}" in self._allowed

    def _data_uri(self, url: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise _Failure("only base64 data: URIs are supported")
        if len(payload) * 3 // 4 > self.source.max_bytes:
            raise _Failure(f"data URI larger than {self.source.max_bytes} bytes")
        try:
            return base64.b64decode(payload)
        except (binascii.Error, ValueError):
            raise _Failure("invalid base64 in data URI") from None

    # ---- HTTP ---------------------------------------------------------------

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def _fetch(self, url: str) -> bytes:
        """GET with manual redirects: same host only, except from an LS storage resolver."""
        deadline = time.monotonic() + self.source.timeout_s
        retried_auth = False
        hops = 0
        while True:
            is_ls = self._is_ls(url)
            headers = self._auth_headers() if is_ls else {}
            resp = self._request("GET", url, deadline, headers=headers, stream=True)
            with resp:
                if resp.status_code == 401 and is_ls and self._uses_refresh() and not retried_auth:
                    retried_auth = True
                    self._forget_access_token()
                    continue
                if resp.is_redirect:
                    hops += 1
                    if hops > MAX_REDIRECTS:
                        raise _Failure(f"more than {MAX_REDIRECTS} redirects")
                    url = self._redirect_target(url, resp.headers.get("Location", ""))
                    continue
                if resp.status_code >= 400:
                    raise _Failure(self._http_error(resp.status_code, url, is_ls))
                return self._read(resp, deadline)

    def _redirect_target(self, url: str, location: str) -> str:
        target = urljoin(url, location)
        try:
            parts = urlsplit(target)
            _ = parts.port  # raises ValueError on a bad port
        except ValueError:
            raise _Failure("redirect to a malformed URL") from None
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise _Failure(f"redirect to unsupported URL {redact_url(target)}")
        same_host = parts.hostname.lower() == (urlsplit(url).hostname or "").lower()
        from_resolver = self._is_ls(url) and _RESOLVER_PATH.search(urlsplit(url).path)
        if not same_host and not from_resolver:
            raise _Failure(f"refusing redirect to another host ({redact_url(target)})")
        return target

    def _request(self, method: str, url: str, deadline: float, **kwargs: Any) -> requests.Response:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Failure(f"timed out after {self.source.timeout_s} s")
        try:
            return self._session().request(
                method, url, timeout=remaining, allow_redirects=False, **kwargs
            )
        except requests.Timeout:
            raise _Failure(f"timed out after {self.source.timeout_s} s ({redact_url(url)})") from None
        except requests.RequestException as e:
            raise _Failure(f"request to {redact_url(url)} failed ({type(e).__name__})") from None

    def _read(self, resp: requests.Response, deadline: float) -> bytes:
        limit = self.source.max_bytes
        length = resp.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limit:
            raise _Failure(f"response is {length} bytes, more than the limit of {limit}")
        buf = bytearray()
        try:
            for chunk in resp.iter_content(_CHUNK):
                buf += chunk
                if len(buf) > limit:
                    raise _Failure(f"response exceeds the limit of {limit} bytes")
                if time.monotonic() > deadline:
                    raise _Failure(f"timed out after {self.source.timeout_s} s")
        except requests.RequestException as e:
            raise _Failure(f"reading the response failed ({type(e).__name__})") from None
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

    def _uses_refresh(self) -> bool:
        return self._claims is not None and self._claims.get("token_type") != "access"

    def _auth_headers(self) -> dict[str, str]:
        token = self.source.token
        if not token:
            return {}
        if self._claims is None:
            return {"Authorization": f"Token {token}"}
        if not self._uses_refresh():
            return {"Authorization": f"Bearer {token}"}
        return {"Authorization": f"Bearer {self._access_token()}"}

    def _forget_access_token(self) -> None:
        with self._token_lock:
            self._access = None

    def _access_token(self) -> str:
        """Exchange the personal access (refresh) token for a cached access token."""
        with self._token_lock:
            if self._access and time.time() < self._access_exp - _REFRESH_MARGIN_S:
                return self._access
            deadline = time.monotonic() + self.source.timeout_s
            resp = self._request(
                "POST", self._require_ls() + TOKEN_REFRESH_PATH, deadline,
                json={"refresh": self.source.token},
            )
            with resp:
                if resp.status_code != 200:
                    exp = (self._claims or {}).get("exp")
                    expired = isinstance(exp, (int, float)) and exp < time.time()
                    hint = " (the personal access token has expired)" if expired else ""
                    raise _Failure(f"Label Studio token refresh failed: HTTP {resp.status_code}{hint}")
                try:
                    access = resp.json()["access"]
                except (ValueError, KeyError, TypeError):
                    raise _Failure("Label Studio token refresh returned no access token") from None
            if not isinstance(access, str) or not access:
                raise _Failure("Label Studio token refresh returned no access token")
            exp = (_jwt_claims(access) or {}).get("exp")
            self._access = access
            self._access_exp = float(exp) if isinstance(exp, (int, float)) else time.time() + 300
            return access
