"""Which of a project's ML backend and webhook URLs point at *this* backend, however they are spelled.

A deployment has an instance id: a random id kept in MODEL_DIR/instance-id, created by the first process that
starts on it, so every gunicorn worker and the training worker of one deployment answer the same id in /health.
Two URLs are the same backend when
1. both answer /health with an instance id: the ids are equal (decisive whenever both answer), else
2. they name the same scheme, port and path on the same host: the same name, names sharing an address, or names
   whose addresses are all on this machine (loopback, or an address this machine can bind): `localhost`,
   `127.0.0.1`, the host's own name and its interface addresses are one host.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

INSTANCE_FILE = "instance-id"
HEALTH_TIMEOUT_S = 3.0  # per URL: connect asks each of a project's backends once
WEBHOOK_PATH = "/webhook"


def instance_id(model_dir: Path) -> str | None:
    """MODEL_DIR's instance id, created once (the first process's id wins: a hard link never replaces a file);
    None when MODEL_DIR cannot be read or written."""
    path = Path(model_dir) / INSTANCE_FILE
    try:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            candidate = path.with_name(f".{INSTANCE_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
            candidate.write_text(uuid.uuid4().hex)
            try:
                os.link(candidate, path)
            except FileExistsError:
                pass
            finally:
                candidate.unlink(missing_ok=True)
        return path.read_text().strip() or None
    except OSError:
        return None


@dataclass(frozen=True)
class Endpoint:
    """A URL reduced to what locates a server: scheme, host (lower case), port (the scheme's default filled
    in), path (no trailing slash)."""

    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> "Endpoint | None":
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except (ValueError, AttributeError):
            return None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        return cls(parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80),
                   parts.path.rstrip("/"))

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def webhook_base(url: str) -> str | None:
    """The backend URL a webhook URL `<backend>/webhook` belongs to, None for any other webhook."""
    stripped = url.strip().rstrip("/")
    return stripped[: -len(WEBHOOK_PATH)] if stripped.endswith(WEBHOOK_PATH) else None


def _addresses(host: str) -> frozenset[str]:
    """The host's addresses (empty when it does not resolve here)."""
    try:
        return frozenset(str(info[4][0]).split("%")[0] for info in socket.getaddrinfo(host, None))
    except (OSError, UnicodeError):
        return frozenset()


def _on_this_machine(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.is_loopback or (getattr(ip, "ipv4_mapped", None) or ip).is_loopback:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))  # only an address of one of this machine's interfaces can be bound
        return True
    except OSError:
        return False


def same_host(a: str, b: str) -> bool:
    """The two host names name one machine (as seen from here)."""
    if a == b:
        return True
    first, second = _addresses(a), _addresses(b)
    if not first or not second:
        return False
    return bool(first & second) or all(_on_this_machine(x) for x in first | second)


class BackendMatcher:
    """Decides whether a URL points at the backend at `our_url` (the URL Label Studio is told to use); asks
    each URL's /health at most once."""

    def __init__(self, our_url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
        self.ours = Endpoint.parse(our_url)
        self.timeout_s = timeout_s
        self._ids: dict[str, str | None] = {}
        self._verdicts: dict[Endpoint, str | None] = {}
        self.identity = self.instance_of(self.ours) if self.ours else None

    def instance_of(self, endpoint: Endpoint) -> str | None:
        """The instance id the backend at `endpoint` answers in /health, None when it does not answer one."""
        if endpoint.base not in self._ids:
            import requests

            try:
                with requests.get(endpoint.base + "/health", timeout=self.timeout_s, allow_redirects=False) as resp:
                    body = resp.json() if resp.status_code == 200 else {}
                found = body.get("instance") if isinstance(body, dict) else None
                self._ids[endpoint.base] = found if isinstance(found, str) and found else None
            except (requests.RequestException, ValueError):
                self._ids[endpoint.base] = None
        return self._ids[endpoint.base]

    def same(self, url: str) -> str | None:
        """How `url` was recognised as this backend ("the same URL", "the same instance id", "the same host,
        port and path"), or None when it is another backend (or not a URL)."""
        theirs = Endpoint.parse(url)
        if theirs is None or self.ours is None:
            return None
        if theirs not in self._verdicts:
            self._verdicts[theirs] = self._compare(theirs)
        return self._verdicts[theirs]

    def _compare(self, theirs: Endpoint) -> str | None:
        if theirs == self.ours:
            return "the same URL"
        their_id = self.instance_of(theirs)
        if self.identity and their_id:
            return "the same instance id" if their_id == self.identity else None
        if (theirs.scheme, theirs.port, theirs.path) == (self.ours.scheme, self.ours.port, self.ours.path) and \
                same_host(theirs.host, self.ours.host):
            return "the same host, port and path"
        return None
