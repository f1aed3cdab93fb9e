"""Load a Label Studio task image into an RGB uint8 array, as Label Studio displays it.

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
import ipaddress
import json
import os
import re
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, parse_qsl, quote, urlencode, urljoin, urlsplit

import numpy as np
import requests
from PIL import Image, ImageOps
from requests.adapters import HTTPAdapter

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
    # hosts besides Label Studio's for plain http(s) URLs: "name", "name:port", "*.example.com";
    # empty = Label Studio's host only (plus public signed URLs its storage resolvers redirect to)
    allowed_hosts: tuple[str, ...] = ()
    timeout_s: float = 30.0  # total per load, redirects included
    max_pixels: int = 50_000_000
    max_bytes: int = 100 * 1024 * 1024
    allow_private: bool = False  # allow-listed hosts may be loopback/private/CGNAT/unique-local


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


# ---- host names and addresses ----------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_NUMBER = re.compile(r"0x[0-9a-f]*|[0-9]+")  # a label an IPv4 parser reads as a number
_NETLOC_ASCII_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:[]")
_ip = ipaddress.ip_address
_net = ipaddress.ip_network

# never fetched, whatever the settings
_METADATA = frozenset(map(_ip, ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")))
# fetched from allow-listed hosts only with allow_private (ALLOW_PRIVATE_IMAGE_HOSTS)
_PRIVATE = tuple((_net(n), what) for n, what in (
    ("127.0.0.0/8", "loopback"), ("::1/128", "loopback"),
    ("10.0.0.0/8", "private"), ("172.16.0.0/12", "private"), ("192.168.0.0/16", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"), ("fc00::/7", "unique-local (private)"),
))
# special-purpose ranges (RFC 6890 and friends) that ipaddress's is_global misses in some versions
_NON_PUBLIC = tuple(map(_net, (
    "0.0.0.0/8", "192.0.0.0/24", "192.0.2.0/24", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "240.0.0.0/4", "::/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "fec0::/10",
)))
_NAT64 = _net("64:ff9b::/96")


def _ipv4_number(label: str) -> int:
    if label.startswith("0x"):
        return int(label[2:] or "0", 16)
    if len(label) > 1 and label.startswith("0"):
        return int(label, 8)  # ValueError on 8 or 9, as inet_aton refuses them
    return int(label)


def _parse_ipv4(labels: list[str]) -> ipaddress.IPv4Address:
    """inet_aton's (and browsers') reading: 1 to 4 numbers, each decimal, 0x-hex or 0-octal;
    the last one fills the remaining bytes (``127.1`` is 127.0.0.1, ``2130706433`` too)."""
    if len(labels) > 4:
        raise ValueError("more than 4 numbers in an IPv4 address")
    try:
        numbers = [_ipv4_number(label) for label in labels]
    except ValueError:
        raise ValueError("a host ending in a number must be an IPv4 address") from None
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        raise ValueError("IPv4 address out of range")
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def normalize_host(host: str) -> str:
    """The canonical form of a URL's host, the one the allow-list and the Label Studio origin are
    compared with: lower case, no trailing dot, IDNA (ASCII), IPv4 addresses in any spelling as a
    dotted quad, IPv6 compressed (an IPv4-mapped one as its IPv4 address). ValueError if invalid."""
    h = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in h:
        if "%" in h:
            raise ValueError("IPv6 zone identifiers are not supported")
        ip6 = ipaddress.IPv6Address(h)  # ValueError
        return str(ip6.ipv4_mapped) if ip6.ipv4_mapped else ip6.compressed
    if not h.isascii():
        try:
            h = h.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError("invalid internationalised host name") from None
    h = h.lower()
    if h.endswith("."):
        h = h[:-1]
    if not _HOST_NAME.fullmatch(h):
        raise ValueError("invalid host name")
    labels = h.split(".")
    if _NUMBER.fullmatch(labels[-1]):  # ends in a number: an IPv4 address, however spelled
        return str(_parse_ipv4(labels))
    return h


def _as_ip(host: str) -> IPAddress | None:
    try:
        return _ip(host)
    except ValueError:
        return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one reaches: mapped, compatible, NAT64, 6to4, Teredo."""
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if int(ip) >> 32 == 0 and int(ip) > 1 or ip in _NAT64:  # ::a.b.c.d, 64:ff9b::a.b.c.d
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour:
        return ip.sixtofour
    if ip.teredo:
        return ip.teredo[1]
    return None


def address_problem(address: str | IPAddress, allow_private: bool = False) -> str | None:
    """Why an image may not be fetched from ``address`` (None: it may). Cloud metadata,
    link-local, multicast, unspecified and reserved addresses are always refused; loopback,
    private (RFC 1918, unique-local) and CGNAT ones unless ``allow_private``."""
    ip = _ip(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            problem = address_problem(embedded, allow_private)
            if problem:
                return f"{problem} (as {ip})"
            if not ip.teredo:  # a Teredo address is judged as itself too (2001::/23: reserved)
                return None
    if ip in _METADATA:
        return "a cloud metadata address"
    if ip.is_unspecified or ip in _net("0.0.0.0/8"):
        return "an unspecified address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    for network, what in _PRIVATE:
        if ip in network:
            return None if allow_private else f"a {what} address"
    if ip.is_reserved or not ip.is_global or any(ip in n for n in _NON_PUBLIC):
        return "a reserved (non-public) address"
    return None


def _split_host_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError("junk after ']'")
        port = rest[1:] if rest else None
    elif entry.count(":") == 1:
        host, port = entry.split(":")
    else:
        host, port = entry, None
    if port is None:
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid port {port!r}")
    return host, int(port)


def parse_allowed_hosts(entries: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate and normalise allow-list entries (a comma-separated string or a sequence):
    ``name``, ``name:port``, ``*.example.com`` (any subdomain, any port), IP addresses. A URL's
    host must equal an entry after both are normalised. ValueError names a bad entry."""
    items = entries.split(",") if isinstance(entries, str) else list(entries)
    out: list[str] = []
    for raw in items:
        entry = raw.strip()
        if not entry:
            continue
        try:
            if "/" in entry or "@" in entry:
                raise ValueError("give a host name (no scheme, path or user)")
            if entry.startswith("*."):
                suffix = normalize_host(entry[2:])
                if _as_ip(suffix) is not None or "." not in suffix:
                    raise ValueError("a wildcard needs a domain with a dot, like *.example.com")
                out.append("*." + suffix)
                continue
            host, port = _split_host_port(entry)
            host = normalize_host(host)
            host = f"[{host}]" if ":" in host else host
            out.append(f"{host}:{port}" if port else host)
        except ValueError as e:
            raise ValueError(f"allowed image host {entry!r} is invalid: {e}") from None
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class _Url:
    """An http(s) URL as parsed and normalised here; requests get rebuilt from it."""

    scheme: str
    host: str  # normalize_host's form
    port: int
    path: str  # path and query

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def _split_url(url: str) -> SplitResult:
    """urlsplit, with a bad port found now: _Failure("malformed URL") before any connection."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        raise _Failure("malformed URL") from None
    return parts


def _parse_url(url: str) -> _Url:
    """Split and normalise an http(s) URL; _Failure (before any connection) if it is not one."""
    parts = _split_url(url)
    port = parts.port
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _Failure(f"unsupported URL scheme {scheme or '(none)'!r}")
    if "@" in parts.netloc:
        raise _Failure("URLs with credentials (user@host) are not allowed")
    if not parts.hostname:
        raise _Failure("URL has no host")
    if any(c not in _NETLOC_ASCII_OK if c.isascii() else not c.isprintable() or c.isspace()
           for c in parts.netloc):
        raise _Failure("malformed host in URL")
    try:
        host = normalize_host(parts.hostname)
    except ValueError as e:
        raise _Failure(f"malformed host in URL ({e})") from None
    if port == 0:
        raise _Failure("malformed URL (port 0)")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Url(scheme, host, port or (443 if scheme == "https" else 80), path)


@dataclass(frozen=True)
class _Target:
    """One request the policy allowed: ``kind`` is "ls" (Label Studio, trusted), "allowed" (an
    allow-listed host) or "signed" (a public host a storage resolver redirected to)."""

    url: str
    parsed: _Url
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
    """Fetches and decodes task images; thread-safe (one requests.Session per thread).

    ValueError at construction if an ``allowed_hosts`` entry is invalid."""

    def __init__(self, source: ImageSource) -> None:
        self.source = source
        self._ls_url: str | None = None  # base URL (no user@), path prefix kept, no trailing slash
        self._ls_prefix = ""  # scheme://netloc of Label Studio, as configured
        self._ls: _Url | None = None
        if source.label_studio_url:
            self._ls_url = source.label_studio_url.strip()
            try:
                parts = urlsplit(self._ls_url)
                self._ls_prefix = f"{parts.scheme.lower()}://{parts.netloc.rpartition('@')[2]}"
                self._ls_url = self._ls_prefix + parts.path.rstrip("/")
                self._ls = _parse_url(self._ls_prefix + "/")
            except (ValueError, _Failure):
                self._ls = None  # _require_ls says so
        allowed = parse_allowed_hosts(source.allowed_hosts)
        self._allowed_exact = frozenset(h for h in allowed if not h.startswith("*."))
        self._allowed_suffixes = tuple(h[1:] for h in allowed if h.startswith("*."))  # ".example.com"
        self._claims = jwt_claims(source.token) if source.token else None
        self._local = threading.local()
        self._sessions: list[requests.Session | HTTPAdapter] = []
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
        """Close all HTTP sessions and connection pools."""
        with self._sessions_lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()
        self._local = threading.local()

    # ---- URL dispatch -------------------------------------------------------

    def _get_bytes(self, url: str, task_id: int | None) -> bytes:
        parts = _split_url(url)
        scheme = parts.scheme.lower()
        if scheme == "data":
            return self._data_uri(url)
        if scheme in CLOUD_SCHEMES:
            if not isinstance(task_id, int) or isinstance(task_id, bool):
                raise _Failure(f"{scheme}:// URIs are resolved through Label Studio and need a task id")
            b64 = base64.urlsafe_b64encode(url.encode()).decode()
            return self._fetch(f"{self._require_ls()}/tasks/{task_id}/presign/?fileuri={quote(b64)}")
        if scheme in ("http", "https"):
            return self._fetch(url)
        if not scheme and not parts.netloc and url.startswith("/"):
            return self._fetch(self._require_ls() + url)
        raise _Failure(f"unsupported URL scheme {scheme or '(none)'!r}")

    def _require_ls(self) -> str:
        if not self._ls_url:
            raise _Failure("no Label Studio URL configured (LABEL_STUDIO_URL or /setup hostname)")
        if self._ls is None:
            raise _Failure(f"the Label Studio URL {redact_url(self._ls_url)} is malformed")
        return self._ls_url

    def _host_allowed(self, url: _Url) -> bool:
        host = f"[{url.host}]" if ":" in url.host else url.host
        if host in self._allowed_exact or f"{host}:{url.port}" in self._allowed_exact:
            return True
        return _as_ip(url.host) is None and url.host.endswith(self._allowed_suffixes)

    def _target(self, url: str, previous: _Target | None = None) -> _Target:
        """Judge ``url`` (a task URL, or a redirect from ``previous``) before connecting to it."""
        try:
            parsed = _parse_url(url)
        except _Failure as e:
            if previous is None:
                raise
            raise _Failure(f"redirect to unsupported URL {redact_url(url)} ({e})") from None
        shown = redact_url(url)
        if self._ls is not None and parsed.origin == self._ls.origin:
            if previous is not None and previous.kind != "ls":
                raise _Failure(f"refusing redirect to another host ({shown})")
            return _Target(self._ls_prefix + parsed.path, parsed, "ls",
                           resolver=bool(_RESOLVER_PATH.search(urlsplit(parsed.path).path)))
        allowed = self._host_allowed(parsed)
        if previous is None:
            if not allowed:
                raise _Failure(f"host {parsed.host!r} is not the Label Studio host and not in the allowed "
                               "hosts (ALLOWED_IMAGE_HOSTS)")
            kind = "allowed"
        elif previous.kind == "ls":
            if not allowed and not previous.resolver:
                raise _Failure(f"refusing redirect to another host ({shown})")
            kind = "allowed" if allowed else "signed"
        else:  # an allow-listed host or a signed URL may redirect to the same host only
            if parsed.host != previous.parsed.host:
                raise _Failure(f"refusing redirect to another host ({shown})")
            if previous.kind == "allowed" and not allowed:
                raise _Failure(f"refusing redirect to {shown}: not in the allowed hosts")
            kind = "allowed" if allowed else previous.kind
        address = self._checked_address(parsed.host, parsed.port, kind)
        return _Target(f"{parsed.scheme}://{parsed.netloc}{parsed.path}", parsed, kind, address)

    def _checked_address(self, host: str, port: int, kind: str) -> str:
        """Resolve ``host`` once; refuse it if any address is off limits; the address to connect to."""
        private_ok = kind == "allowed" and self.source.allow_private
        literal = _as_ip(host)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError):
                raise _Failure(f"cannot resolve host {host!r}") from None
            addresses = []
            for family, _, _, _, sockaddr in infos:
                if family in (socket.AF_INET, socket.AF_INET6):
                    address = _ip(str(sockaddr[0]).split("%")[0])
                    if address not in addresses:
                        addresses.append(address)
            if not addresses:
                raise _Failure(f"cannot resolve host {host!r}")
        for address in addresses:
            problem = address_problem(address, private_ok)
            if problem:
                where = f"{host}" if literal is not None else f"{host} (it resolves to {address})"
                hint = ""
                if kind == "allowed" and not private_ok and address_problem(address, True) is None:
                    hint = "; ALLOW_PRIVATE_IMAGE_HOSTS=true allows internal allow-listed hosts"
                elif kind == "signed":
                    hint = "; signed URLs must be on public hosts unless their host is allow-listed"
                raise _Failure(f"refusing to fetch from {where}: {problem}{hint}")
        return str(addresses[0])

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
            headers = self._auth_headers() if is_ls else {}
            resp = self._get(target, deadline, headers)
            with resp:
                if resp.status_code == 401 and is_ls and self._uses_refresh() and not retried_auth:
                    retried_auth = True
                    self._forget_access_token()
                    continue
                if resp.is_redirect:
                    hops += 1
                    if hops > MAX_REDIRECTS:
                        raise _Failure(f"more than {MAX_REDIRECTS} redirects")
                    target = self._target(urljoin(target.url, resp.headers.get("Location", "")), target)
                    continue
                if resp.status_code >= 400:
                    raise _Failure(self._http_error(resp.status_code, target.url, is_ls))
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
            raise _Failure(f"timed out after {self.source.timeout_s} s")
        try:
            if send is not None:
                return send(remaining)
            return self._session().request(
                method, url, timeout=remaining, allow_redirects=False, **kwargs
            )
        except requests.Timeout:
            raise _Failure(f"timed out after {self.source.timeout_s} s ({redact_url(url)})") from None
        except requests.exceptions.SSLError:
            raise _Failure(f"request to {redact_url(url)} failed (TLS certificate or handshake error)") from None
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
            exp = (jwt_claims(access) or {}).get("exp")
            self._access = access
            self._access_exp = float(exp) if isinstance(exp, (int, float)) else time.time() + 300
            return access
