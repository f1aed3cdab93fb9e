"""HTTP stand-ins for image fetching tests: a tiny threaded server on loopback, a fake resolver for made-up
host names, and image/JWT builders. The fixtures using them (ls, other, fake_dns, no_connect) are in conftest.py."""
from __future__ import annotations

import base64
import io
import ipaddress
import json
import socket
import struct
import threading
import zlib
from typing import Callable

import numpy as np
from PIL import Image
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from ml_backend.fetch import ImageFetcher, ImageSource

LEGACY = "legacytoken0123456789abcdef"





class Server:
    """A tiny threaded HTTP server; ``routes`` maps a path to ``handler(request) -> Response``."""

    def __init__(self, host: str, ssl_context=None) -> None:
        self.routes: dict[str, Callable[[Request], Response]] = {}
        self.requests: list[dict] = []
        self._srv = make_server(host, 0, self._app, threaded=True, ssl_context=ssl_context)
        self.port = self._srv.server_port
        self.url = f"{'https' if ssl_context else 'http'}://{host}:{self.port}"
        threading.Thread(target=self._srv.serve_forever, args=(0.02,), daemon=True).start()

    @Request.application
    def _app(self, request: Request) -> Response:
        self.requests.append(
            {"method": request.method, "path": request.path, "args": dict(request.args),
             "auth": request.headers.get("Authorization"), "body": request.get_data(),
             "host": request.headers.get("Host")}
        )
        handler = self.routes.get(request.path)
        return handler(request) if handler else Response("not found", status=404)

    def serve(self, path: str, body: bytes, content_type: str = "image/png") -> None:
        self.routes[path] = lambda request: Response(body, content_type=content_type)

    def close(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()


class FakeDNS:
    """``socket.getaddrinfo`` for made-up names: ``answers[name]`` is a list of addresses, or a
    list of such lists handed out one per lookup. IP literals go to the real getaddrinfo (no DNS);
    any other name fails, so tests never do a real DNS lookup."""

    def __init__(self, real) -> None:
        self.answers: dict[str, list] = {}
        self.lookups: list[str] = []
        self._real = real

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else str(host)
        try:
            ipaddress.ip_address(name.split("%")[0])
            return self._real(host, port, family, type, proto, flags)
        except ValueError:
            pass
        self.lookups.append(name)
        answer = self.answers.get(name)
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (fake DNS)")
        if answer and isinstance(answer[0], list):
            answer = answer.pop(0) if len(answer) > 1 else answer[0]
        out = []
        for address in answer:
            if ":" in address:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, int(port or 0), 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port or 0))))
        return out


def encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def make_jwt(claims: dict) -> str:
    def b64(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64(claims)}.c2lnbmF0dXJl"


def loader(ls: Server | None = None, **kwargs) -> ImageFetcher:
    kwargs.setdefault("token", LEGACY)
    kwargs.setdefault("timeout_s", 5.0)
    return ImageFetcher(ImageSource(label_studio_url=ls.url if ls else None, **kwargs))


def rgb_image(w: int = 8, h: int = 6) -> Image.Image:
    a = np.arange(w * h * 3, dtype=np.uint8).reshape(h, w, 3)
    return Image.fromarray(a, "RGB")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with no real pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))

