"""Tests for image fetching (ml_backend.fetch, netpolicy) and decoding (trainer.images); real HTTP on loopback only (127.0.0.1 and 127.0.0.2).

Made-up host names (``*.example.test``) are answered by a fake resolver (``fake_dns``) that
never does a real DNS lookup; tests of refused addresses outside loopback make any connection
attempt fail loudly (``no_connect``), so the refusal must come from the address check."""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image
import urllib3.util.connection
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from ml_backend import netpolicy
from ml_backend.fetch import ImageError, ImageFetcher, ImageSource
from ml_backend.netpolicy import address_problem, normalize_host, parse_allowed_hosts, redact_url
from trainer.images import decode_image

LEGACY = "legacytoken0123456789abcdef"


# ---- helpers -------------------------------------------------------------------


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


@pytest.fixture
def ls():
    server = Server("127.0.0.1")
    yield server
    server.close()


@pytest.fixture
def other():
    server = Server("127.0.0.2")
    yield server
    server.close()


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


@pytest.fixture
def fake_dns(monkeypatch):
    dns = FakeDNS(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    return dns


@pytest.fixture
def no_connect(monkeypatch):
    """Any outgoing connection attempt fails the test loudly; yields the list of attempts."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"connection attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib3.util.connection, "create_connection", refuse)
    return attempts


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


# ---- fetching and auth ----------------------------------------------------------


def test_relative_upload_url_fetched_with_token_header(ls):
    im = rgb_image()
    ls.serve("/data/upload/3/1a2b3c4d-cat.png", encode(im))
    arr = loader(ls).load("/data/upload/3/1a2b3c4d-cat.png")
    assert arr.dtype == np.uint8 and arr.shape == (6, 8, 3)
    np.testing.assert_array_equal(arr, np.asarray(im))
    assert ls.requests[-1]["auth"] == f"Token {LEGACY}"


def test_local_files_url_keeps_query(ls):
    ls.serve("/data/local-files/", encode(rgb_image()))
    loader(ls).load("/data/local-files/?d=images/cat%201.png")
    assert ls.requests[-1]["args"] == {"d": "images/cat 1.png"}
    assert ls.requests[-1]["auth"] == f"Token {LEGACY}"


def test_relative_url_without_label_studio_url_is_refused():
    with pytest.raises(ImageError, match="no Label Studio URL"):
        loader(None).load("/data/upload/1/x.png")


def test_malformed_label_studio_url_is_reported():
    for bad in ("http://[::1/", "label-studio:8080", "ftp://ls.example/"):
        with pytest.raises(ImageError, match="Label Studio URL .* is malformed"):
            ImageFetcher(ImageSource(label_studio_url=bad)).load("/data/upload/1/a.png")


def test_label_studio_url_with_a_path_prefix(ls):
    ls.serve("/ls/data/upload/1/a.png", encode(rgb_image()))
    ld = ImageFetcher(ImageSource(label_studio_url=ls.url + "/ls/", token=LEGACY, timeout_s=5.0))
    assert ld.load("/data/upload/1/a.png").shape == (6, 8, 3)
    assert ld.load(ls.url + "/ls/data/upload/1/a.png").shape == (6, 8, 3)
    assert [r["auth"] for r in ls.requests] == [f"Token {LEGACY}"] * 2


def test_absolute_url_on_label_studio_host_gets_token(ls):
    ls.serve("/data/upload/1/a.png", encode(rgb_image()))
    loader(ls).load(ls.url + "/data/upload/1/a.png")
    assert ls.requests[-1]["auth"] == f"Token {LEGACY}"


def test_token_not_sent_to_allowed_foreign_host(ls, other):
    other.serve("/pics/a.png", encode(rgb_image()))
    arr = loader(ls, allowed_hosts=("127.0.0.2",), allow_private=True).load(other.url + "/pics/a.png")
    assert arr.shape == (6, 8, 3)
    assert other.requests[-1]["auth"] is None
    assert ls.requests == []


def test_other_port_on_same_host_is_foreign(ls):
    # same host, different port: a different origin, so not Label Studio (refused unless
    # allow-listed) and, when allow-listed, no token
    second = Server("127.0.0.1")
    try:
        second.serve("/a.png", encode(rgb_image()))
        with pytest.raises(ImageError, match="not in the allowed hosts"):
            loader(ls).load(second.url + "/a.png")
        assert second.requests == []
        loader(ls, allowed_hosts=("127.0.0.1",), allow_private=True).load(second.url + "/a.png")
        assert second.requests[-1]["auth"] is None
    finally:
        second.close()


def test_allowed_hosts_restricts_plain_urls(ls, other):
    other.serve("/a.png", encode(rgb_image()))
    with pytest.raises(ImageError, match="not in the allowed hosts"):
        loader(ls, allowed_hosts=("images.example.org",)).load(other.url + "/a.png")
    assert other.requests == []
    # allow-listed but loopback: refused unless ALLOW_PRIVATE_IMAGE_HOSTS
    with pytest.raises(ImageError, match="loopback address; ALLOW_PRIVATE_IMAGE_HOSTS"):
        loader(ls, allowed_hosts=("127.0.0.2",)).load(other.url + "/a.png")
    assert other.requests == []
    loader(ls, allowed_hosts=("127.0.0.2",), allow_private=True).load(other.url + "/a.png")
    loader(ls, allowed_hosts=(f"127.0.0.2:{other.port}",), allow_private=True).load(other.url + "/a.png")
    with pytest.raises(ImageError, match="not in the allowed hosts"):
        loader(ls, allowed_hosts=("127.0.0.2:1",), allow_private=True).load(other.url + "/a.png")
    assert len(other.requests) == 2
    # the Label Studio host itself is always allowed
    ls.serve("/data/upload/1/a.png", encode(rgb_image()))
    loader(ls, allowed_hosts=("images.example.org",)).load(ls.url + "/data/upload/1/a.png")


def test_jwt_personal_access_token_is_exchanged_once(ls):
    refresh = make_jwt({"token_type": "refresh", "exp": time.time() + 3600})
    access = make_jwt({"token_type": "access", "exp": time.time() + 300})

    def refresh_endpoint(request):
        assert json.loads(request.get_data()) == {"refresh": refresh}
        return Response(json.dumps({"access": access}), content_type="application/json")

    def image(request):
        if request.headers.get("Authorization") != f"Bearer {access}":
            return Response(status=401)
        return Response(encode(rgb_image()), content_type="image/png")

    ls.routes["/api/token/refresh/"] = refresh_endpoint
    ls.routes["/data/upload/1/a.png"] = image
    ld = loader(ls, token=refresh)
    for _ in range(3):
        assert ld.load("/data/upload/1/a.png").shape == (6, 8, 3)
    paths = [r["path"] for r in ls.requests]
    assert paths.count("/api/token/refresh/") == 1
    assert paths.count("/data/upload/1/a.png") == 3


def test_jwt_refreshed_again_on_401_and_near_expiry(ls):
    refresh = make_jwt({"token_type": "refresh", "exp": time.time() + 3600})
    issued: list[str] = []
    valid: set[str] = set()

    def refresh_endpoint(request):
        # first access token expires within the refresh margin, so the next load refreshes
        exp = time.time() + (10 if not issued else 300)
        token = make_jwt({"token_type": "access", "exp": exp, "n": len(issued)})
        issued.append(token)
        valid.clear()
        valid.add(token)
        return Response(json.dumps({"access": token}), content_type="application/json")

    def image(request):
        auth = request.headers.get("Authorization", "")
        if auth.removeprefix("Bearer ") not in valid:
            return Response(status=401)
        return Response(encode(rgb_image()), content_type="image/png")

    ls.routes["/api/token/refresh/"] = refresh_endpoint
    ls.routes["/data/upload/1/a.png"] = image
    ld = loader(ls, token=refresh)
    ld.load("/data/upload/1/a.png")
    ld.load("/data/upload/1/a.png")  # cached token is near expiry -> refreshed first
    assert len(issued) == 2
    valid.clear()  # server revokes the access token: 401 -> one refresh and retry
    ld.load("/data/upload/1/a.png")
    assert len(issued) == 3


def test_jwt_refresh_failure_is_reported_without_token(ls):
    refresh = make_jwt({"token_type": "refresh", "exp": time.time() - 10})
    ls.routes["/api/token/refresh/"] = lambda r: Response('{"detail": "expired"}', status=401)
    with pytest.raises(ImageError) as info:
        loader(ls, token=refresh).load("/data/upload/1/a.png")
    assert "token refresh failed: HTTP 401" in str(info.value)
    assert "expired" in str(info.value)
    assert refresh not in str(info.value)


def test_concurrent_loads_share_one_token_exchange(ls):
    refresh = make_jwt({"token_type": "refresh", "exp": time.time() + 3600})
    access = make_jwt({"token_type": "access", "exp": time.time() + 300})

    def refresh_endpoint(request):
        time.sleep(0.1)
        return Response(json.dumps({"access": access}), content_type="application/json")

    ls.routes["/api/token/refresh/"] = refresh_endpoint
    ls.serve("/data/upload/1/a.png", encode(rgb_image()))
    ld = loader(ls, token=refresh)
    with ThreadPoolExecutor(8) as pool:
        shapes = list(pool.map(lambda _: ld.load("/data/upload/1/a.png").shape, range(16)))
    assert shapes == [(6, 8, 3)] * 16
    assert [r["path"] for r in ls.requests].count("/api/token/refresh/") == 1
    ld.close()


def test_http_404_is_image_error_without_token(ls):
    with pytest.raises(ImageError, match="HTTP 404") as info:
        loader(ls).load("/data/upload/1/missing.png")
    assert LEGACY not in str(info.value)
    assert "/data/upload/1/missing.png" in str(info.value)


def test_401_mentions_the_token(ls):
    ls.routes["/data/upload/1/a.png"] = lambda r: Response(status=401)
    with pytest.raises(ImageError, match="API token"):
        loader(ls).load("/data/upload/1/a.png")


def test_local_files_403_mentions_setting(ls):
    ls.routes["/data/local-files/"] = lambda r: Response("disabled", status=403)
    with pytest.raises(ImageError, match="LOCAL_FILES_SERVING_ENABLED"):
        loader(ls).load("/data/local-files/?d=a.png")


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://127.0.0.1/a.png", "images/a.png", "//127.0.0.1/a.png", "",
     "http://127.0.0.1:notaport/a.png", "http:///a.png", "C:\\images\\a.png"],
)
def test_unsupported_urls_are_refused(ls, url):
    with pytest.raises(ImageError):
        loader(ls).load(url)
    assert ls.requests == []


def test_same_host_redirect_is_followed_with_token(ls):
    ls.routes["/data/upload/1/a.png"] = lambda r: Response(status=302, headers={"Location": "/data/upload/1/b.png"})
    ls.serve("/data/upload/1/b.png", encode(rgb_image()))
    assert loader(ls).load("/data/upload/1/a.png").shape == (6, 8, 3)
    assert [r["auth"] for r in ls.requests] == [f"Token {LEGACY}"] * 2


def test_redirect_to_another_host_is_refused(ls, other):
    other.serve("/a.png", encode(rgb_image()))
    ls.routes["/data/upload/1/a.png"] = lambda r: Response(status=302, headers={"Location": other.url + "/a.png"})
    with pytest.raises(ImageError, match="redirect to another host"):
        loader(ls).load("/data/upload/1/a.png")
    assert other.requests == []


def test_redirect_to_file_scheme_is_refused(ls):
    ls.routes["/x.png"] = lambda r: Response(status=302, headers={"Location": "file:///etc/passwd"})
    with pytest.raises(ImageError, match="unsupported URL"):
        loader(ls).load("/x.png")


def test_redirect_loop_is_cut(ls):
    ls.routes["/loop"] = lambda r: Response(status=302, headers={"Location": "/loop"})
    with pytest.raises(ImageError, match="redirects"):
        loader(ls).load("/loop")
    assert 2 <= len(ls.requests) <= 10


def _presign_to(ls: Server, uri: str, signed: str) -> None:
    def presign(request):
        assert base64.urlsafe_b64decode(request.args["fileuri"]).decode() == uri
        return Response(status=303, headers={"Location": signed})

    ls.routes["/tasks/7/presign/"] = presign


def test_cloud_uri_resolved_through_presign_to_allow_listed_storage(ls, other, fake_dns):
    # e.g. MinIO on the internal network: allow-listed, and ALLOW_PRIVATE_IMAGE_HOSTS
    fake_dns.answers["storage.example.test"] = ["127.0.0.2"]
    other.serve("/bucket/key.png", encode(rgb_image()))
    uri = "s3://bucket/dir/key.png"
    _presign_to(ls, uri, f"http://storage.example.test:{other.port}/bucket/key.png?X-Amz-Signature=secret")
    ld = loader(ls, allowed_hosts=("storage.example.test",), allow_private=True)
    assert ld.load(uri, task_id=7).shape == (6, 8, 3)
    assert ls.requests[-1]["auth"] == f"Token {LEGACY}"
    assert other.requests[-1]["auth"] is None
    assert other.requests[-1]["args"] == {"X-Amz-Signature": "secret"}
    assert other.requests[-1]["host"] == f"storage.example.test:{other.port}"


def test_cloud_uri_signed_url_on_a_public_host(ls, other, fake_dns, monkeypatch):
    # a real bucket is public; 127.0.0.2 stands in for a public address here (and only here)
    real = netpolicy.address_problem
    monkeypatch.setattr(netpolicy, "address_problem",
                        lambda ip, allow_private=False: None if str(ip) == "127.0.0.2" else real(ip, allow_private))
    fake_dns.answers["bucket.s3.example.test"] = ["127.0.0.2"]
    other.serve("/key.png", encode(rgb_image()))
    uri = "s3://bucket/key.png"
    _presign_to(ls, uri, f"http://bucket.s3.example.test:{other.port}/key.png?X-Amz-Signature=secret")
    assert loader(ls).load(uri, task_id=7).shape == (6, 8, 3)  # no allow-list needed
    assert other.requests[-1]["auth"] is None
    # only the storage resolvers may send us to another host: not any Label Studio page
    ls.routes["/data/upload/1/a.png"] = lambda r: Response(
        status=302, headers={"Location": f"http://bucket.s3.example.test:{other.port}/key.png"})
    with pytest.raises(ImageError, match="redirect to another host"):
        loader(ls).load("/data/upload/1/a.png")
    assert len(other.requests) == 1


def test_cloud_uri_signed_url_inside_is_refused(ls, other, fake_dns):
    other.serve("/key.png", encode(rgb_image()))
    fake_dns.answers["bucket.s3.example.test"] = ["127.0.0.2"]
    for signed in (other.url + "/key.png", f"http://bucket.s3.example.test:{other.port}/key.png",
                   f"http://2130706434:{other.port}/key.png", "http://169.254.169.254/latest/meta-data/"):
        _presign_to(ls, "s3://b/key.png", signed)
        # not allow-listed: signed URLs must be public, ALLOW_PRIVATE_IMAGE_HOSTS does not change that
        with pytest.raises(ImageError, match="refusing to fetch from .*signed URLs must be on public hosts"):
            loader(ls, allow_private=True).load("s3://b/key.png", task_id=7)
    assert other.requests == []


def test_cloud_uri_needs_task_id(ls):
    with pytest.raises(ImageError, match="task id"):
        loader(ls).load("gs://bucket/a.png")


def test_cloud_uri_error_hides_signature(ls, other):
    ls.routes["/tasks/7/presign/"] = lambda r: Response(
        status=303, headers={"Location": other.url + "/gone.png?sig=topsecret"})
    with pytest.raises(ImageError, match="HTTP 404") as info:
        loader(ls, allowed_hosts=("127.0.0.2",), allow_private=True).load("azure-blob://container/gone.png",
                                                                           task_id=7)
    assert "topsecret" not in str(info.value)


def test_data_uri():
    payload = base64.b64encode(encode(rgb_image())).decode()
    arr = loader(None).load(f"data:image/png;base64,{payload}")
    np.testing.assert_array_equal(arr, np.asarray(rgb_image()))


def test_byte_limit(ls):
    big = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)))
    ls.serve("/with-length.png", big)
    ls.routes["/streamed.png"] = lambda r: Response(iter([big[i:i + 1000] for i in range(0, len(big), 1000)]))
    for path in ("/with-length.png", "/streamed.png"):
        with pytest.raises(ImageError, match="limit of 10000"):
            loader(ls, max_bytes=10_000).load(path)
    assert loader(ls).load("/streamed.png").shape == (200, 200, 3)


def test_timeout(ls):
    def slow(request):
        time.sleep(1.0)
        return Response(encode(rgb_image()), content_type="image/png")

    ls.routes["/slow.png"] = slow
    start = time.monotonic()
    with pytest.raises(ImageError, match="timed out"):
        loader(ls, timeout_s=0.3).load("/slow.png")
    assert time.monotonic() - start < 0.9


# ---- SSRF: which hosts and addresses are fetched --------------------------------

# spellings of 127.0.0.2 (the listener that must never be hit); the {port} is the listener's
LOOPBACK_SPELLINGS = [
    "127.0.0.2", "2130706434", "0x7f000002", "0x7F.0.0.2", "0x7f.0x0.0x0.0x2", "0177.0.0.2", "0177.0.0.02",
    "0177.0.0x0.2", "127.2", "127.0.2", "0x7f.2", "127.0.0.2.", "[::ffff:127.0.0.2]", "[::ffff:7f00:2]",
    "[0:0:0:0:0:ffff:127.0.0.2]",
]


@pytest.mark.parametrize("spelling", LOOPBACK_SPELLINGS)
def test_loopback_spellings_are_refused_before_connecting(ls, other, spelling, monkeypatch):
    other.serve("/a.png", encode(rgb_image()))
    url = f"http://{spelling}:{other.port}/a.png"
    attempts = []
    real_create = urllib3.util.connection.create_connection

    def counting_create(address, *args, **kwargs):
        attempts.append(address)
        return real_create(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", counting_create)
    # not allow-listed
    with pytest.raises(ImageError, match="not in the allowed hosts"):
        loader(ls).load(url)
    # allow-listed by its canonical name (the spelling normalises to it), but loopback
    with pytest.raises(ImageError, match=r"refusing to fetch from 127\.0\.0\.2: a loopback address"):
        loader(ls, allowed_hosts=("127.0.0.2",)).load(url)
    # the Label Studio host is 127.0.0.1: a loopback neighbour is not it
    with pytest.raises(ImageError):
        loader(ls, allowed_hosts=("localhost", "127.0.0.1")).load(url)
    assert other.requests == [] and attempts == [] and ls.requests == []
    # an operator who knowingly allow-lists it gets exactly that address, however spelled
    assert loader(ls, allowed_hosts=("127.0.0.2",), allow_private=True).load(url).shape == (6, 8, 3)
    assert len(other.requests) == 1 and attempts == [("127.0.0.2", other.port)]
    assert other.requests[0]["host"] == f"127.0.0.2:{other.port}"


def test_no_connect_fixture_would_catch_a_connection(ls, other, no_connect):
    # the guard used by the "refused before connecting" tests does see a real attempt
    other.serve("/a.png", encode(rgb_image()))
    with pytest.raises(AssertionError, match="connection attempted"):
        loader(ls, allowed_hosts=("127.0.0.2",), allow_private=True).load(other.url + "/a.png")
    assert no_connect


def test_ipv4_compatible_ipv6_is_judged_by_its_ipv4(ls, other, no_connect):
    for host in ("[::127.0.0.2]", "[::7f00:2]", "[64:ff9b::7f00:2]", "[2002:7f00:2::1]"):
        with pytest.raises(ImageError, match="loopback address"):
            loader(ls, allowed_hosts=(host,)).load(f"http://{host}:{other.port}/a.png")
    assert other.requests == [] and no_connect == []


def test_redirect_from_label_studio_to_inside_is_refused(ls, other):
    other.serve("/a.png", encode(rgb_image()))
    targets = [other.url + "/a.png"] + [f"http://{s}:{other.port}/a.png" for s in LOOPBACK_SPELLINGS[1:6]]
    for target in targets:
        ls.routes["/data/upload/1/a.png"] = lambda r, t=target: Response(status=302, headers={"Location": t})
        with pytest.raises(ImageError, match="redirect to another host"):
            loader(ls).load("/data/upload/1/a.png")
        # allow-listed but loopback: still refused (no ALLOW_PRIVATE_IMAGE_HOSTS)
        with pytest.raises(ImageError, match="loopback address"):
            loader(ls, allowed_hosts=("127.0.0.2",)).load("/data/upload/1/a.png")
    # a storage resolver may redirect to any host, but only a public one
    ls.routes["/tasks/7/presign/"] = lambda r: Response(status=303, headers={"Location": other.url + "/a.png"})
    with pytest.raises(ImageError, match="loopback address"):
        loader(ls).load("s3://bucket/a.png", task_id=7)
    assert other.requests == []


def test_label_studio_may_redirect_to_an_allow_listed_host(ls, other, fake_dns):
    fake_dns.answers["images.example.test"] = ["127.0.0.2"]
    other.serve("/a.png", encode(rgb_image()))
    ls.routes["/data/upload/1/a.png"] = lambda r: Response(
        status=302, headers={"Location": f"http://images.example.test:{other.port}/a.png"})
    ld = loader(ls, allowed_hosts=("images.example.test",), allow_private=True)
    assert ld.load("/data/upload/1/a.png").shape == (6, 8, 3)
    assert other.requests[-1]["auth"] is None  # the token stays with Label Studio


def test_allow_listed_name_resolving_inside_is_refused(ls, other, fake_dns, monkeypatch):
    other.serve("/a.png", encode(rgb_image()))
    fake_dns.answers["images.example.test"] = ["127.0.0.2"]
    url = f"http://images.example.test:{other.port}/a.png"
    with pytest.raises(ImageError, match=r"images.example.test \(it resolves to 127.0.0.2\): a loopback"):
        loader(ls, allowed_hosts=("images.example.test",)).load(url)
    with pytest.raises(ImageError, match="loopback address"):
        loader(ls, allowed_hosts=("*.example.test",)).load(url)
    assert other.requests == []
    assert fake_dns.lookups == ["images.example.test"] * 2


def test_any_resolved_address_inside_refuses_the_host(ls, fake_dns, no_connect):
    # the first answer would pass; the second is private: refused before any connection
    fake_dns.answers["mixed.example.test"] = ["8.8.8.8", "10.1.2.3"]
    fake_dns.answers["v6.example.test"] = ["2606:4700::1111", "::ffff:169.254.169.254"]
    with pytest.raises(ImageError, match=r"resolves to 10.1.2.3\): a private address"):
        loader(ls, allowed_hosts=("mixed.example.test",)).load("http://mixed.example.test/a.png")
    with pytest.raises(ImageError, match="cloud metadata address"):
        loader(ls, allowed_hosts=("v6.example.test",), allow_private=True).load("https://v6.example.test/a.png")
    assert no_connect == [] and ls.requests == []


def test_unresolvable_host_is_an_image_error(ls, fake_dns, no_connect):
    with pytest.raises(ImageError, match="cannot resolve host 'nowhere.example.test'"):
        loader(ls, allowed_hosts=("nowhere.example.test",)).load("http://nowhere.example.test/a.png")
    assert no_connect == []


def test_connection_goes_to_the_checked_address(ls, other, fake_dns):
    # DNS rebinding: the second answer for the name points elsewhere; the name is looked up once
    # per hop and the connection goes to the address that was checked
    fake_dns.answers["images.example.test"] = [["127.0.0.2"], ["127.0.0.3"]]
    other.serve("/a.png", encode(rgb_image()))
    ld = loader(ls, allowed_hosts=("images.example.test",), allow_private=True)
    assert ld.load(f"http://images.example.test:{other.port}/a.png").shape == (6, 8, 3)
    assert fake_dns.lookups == ["images.example.test"]
    assert other.requests[-1]["host"] == f"images.example.test:{other.port}"


def test_proxies_are_not_used_for_checked_hosts(ls, other, fake_dns, monkeypatch):
    # a proxy would resolve the name itself; a dead loopback proxy proves it is bypassed
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.3:9")
    fake_dns.answers["images.example.test"] = ["127.0.0.2"]
    other.serve("/a.png", encode(rgb_image()))
    ld = loader(ls, allowed_hosts=("images.example.test",), allow_private=True)
    assert ld.load(f"http://images.example.test:{other.port}/a.png").shape == (6, 8, 3)


ALWAYS_REFUSED = [  # (URL host, reason): refused even allow-listed with ALLOW_PRIVATE_IMAGE_HOSTS
    ("169.254.169.254", "cloud metadata"), ("2852039166", "cloud metadata"),
    ("0xa9.0xfe.0xa9.0xfe", "cloud metadata"), ("0251.0376.0251.0376", "cloud metadata"),
    ("169.254.43518", "cloud metadata"), ("[::ffff:169.254.169.254]", "cloud metadata"),
    ("[::ffff:a9fe:a9fe]", "cloud metadata"), ("[64:ff9b::a9fe:a9fe]", "cloud metadata"),
    ("[2002:a9fe:a9fe::1]", "cloud metadata"), ("[fd00:ec2::254]", "cloud metadata"),
    ("100.100.100.200", "cloud metadata"), ("169.254.170.2", "link-local"), ("[fe80::1]", "link-local"),
    ("0.0.0.0", "unspecified"), ("0", "unspecified"), ("[::]", "unspecified"), ("224.0.0.1", "multicast"),
    ("[ff02::1]", "multicast"), ("255.255.255.255", "reserved"), ("240.0.0.1", "reserved"),
    ("192.0.2.1", "reserved"), ("198.18.0.1", "reserved"), ("[2001:db8::1]", "reserved"),
    ("[fec0::1]", "reserved"), ("metadata.example.test", "cloud metadata"),
]
PRIVATE = [  # refused unless ALLOW_PRIVATE_IMAGE_HOSTS (never connected to here)
    ("10.0.0.1", "private"), ("012.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"),
    ("3232235777", "private"), ("100.64.0.1", "carrier-grade NAT"), ("[fd12:3456::1]", "unique-local"),
    ("[::1]", "loopback"), ("[::ffff:10.0.0.1]", "private"), ("intranet.example.test", "private"),
]


@pytest.mark.parametrize("host,reason", ALWAYS_REFUSED + PRIVATE)
def test_metadata_and_private_addresses_refused_before_connecting(ls, fake_dns, no_connect, host, reason):
    fake_dns.answers["metadata.example.test"] = ["169.254.169.254"]
    fake_dns.answers["intranet.example.test"] = ["192.168.10.20"]
    url = f"http://{host}/latest/meta-data/"
    with pytest.raises(ImageError, match="not in the allowed hosts"):
        loader(ls).load(url)
    allowed = (normalize_host(host),)
    with pytest.raises(ImageError, match=f"refusing to fetch from .*{reason}"):
        loader(ls, allowed_hosts=allowed).load(url)
    if (host, reason) in ALWAYS_REFUSED:
        with pytest.raises(ImageError, match=f"refusing to fetch from .*{reason}"):
            loader(ls, allowed_hosts=allowed, allow_private=True).load(url)
    assert no_connect == [] and ls.requests == []


@pytest.mark.parametrize("url", [
    "http://{ls}@127.0.0.2:{port}/a.png",  # looks like the Label Studio host, is 127.0.0.2
    "http://user:pw@127.0.0.2:{port}/a.png",
    "http://127.0.0.2:{port}\\@{ls}/a.png",
    "http://127.0.0.2:{port}%2f@{ls}/a.png",
    "http://127.0.0.%32:{port}/a.png",
    "http://127.0.0.2 :{port}/a.png",
    "http://[::ffff:127.0.0.2%25lo]:{port}/a.png",
])
def test_userinfo_and_malformed_host_tricks_are_refused(ls, other, url):
    other.serve("/a.png", encode(rgb_image()))
    ls.serve("/a.png", encode(rgb_image()))
    with pytest.raises(ImageError):
        loader(ls, allowed_hosts=("127.0.0.2",)).load(url.format(ls=ls.url[7:], port=other.port))
    assert other.requests == [] and ls.requests == []


def test_host_names_are_normalised_before_matching(ls, other, fake_dns):
    fake_dns.answers["images.example.test"] = ["127.0.0.2"]
    other.serve("/a.png", encode(rgb_image()))
    ld = loader(ls, allowed_hosts=("Images.Example.Test.",), allow_private=True)
    for host in ("IMAGES.example.TEST", "images.example.test.", "ｉｍａｇｅｓ.example.test"):
        assert ld.load(f"http://{host}:{other.port}/a.png").shape == (6, 8, 3)
        assert other.requests[-1]["host"] == f"images.example.test:{other.port}"
    # exact match only: no suffix or prefix games
    fake_dns.answers["images.example.test.evil.test"] = ["127.0.0.2"]
    fake_dns.answers["ximages.example.test"] = ["127.0.0.2"]
    for host in ("images.example.test.evil.test", "ximages.example.test"):
        with pytest.raises(ImageError, match="not in the allowed hosts"):
            ld.load(f"http://{host}:{other.port}/a.png")
    assert len(other.requests) == 3


def test_wildcard_allows_subdomains_only(ls, other, fake_dns):
    for name in ("a.example.test", "b.a.example.test", "example.test", "badexample.test"):
        fake_dns.answers[name] = ["127.0.0.2"]
    other.serve("/a.png", encode(rgb_image()))
    ld = loader(ls, allowed_hosts=("*.example.test",), allow_private=True)
    for name in ("a.example.test", "B.A.example.test"):
        ld.load(f"http://{name}:{other.port}/a.png")
    for name in ("example.test", "badexample.test"):
        with pytest.raises(ImageError, match="not in the allowed hosts"):
            ld.load(f"http://{name}:{other.port}/a.png")
    assert len(other.requests) == 2


def test_label_studio_origin_is_compared_after_normalisation(ls):
    ls.serve("/data/upload/1/a.png", encode(rgb_image()))
    for host in ("2130706433", "0x7f.1", "127.1", "127.0.0.1.", "[::ffff:127.0.0.1]"):
        loader(ls).load(f"http://{host}:{ls.port}/data/upload/1/a.png")
        assert ls.requests[-1]["auth"] == f"Token {LEGACY}"
        assert ls.requests[-1]["host"] == f"127.0.0.1:{ls.port}"  # requested as configured
    ls_by_name = ImageFetcher(ImageSource(label_studio_url=f"http://LOCALHOST:{ls.port}/", token=LEGACY))
    assert ls_by_name.load(f"http://localhost.:{ls.port}/data/upload/1/a.png").shape == (6, 8, 3)
    assert ls.requests[-1]["auth"] == f"Token {LEGACY}"
    # a name is not its address: 127.0.0.1 is not "localhost" for the origin check
    with pytest.raises(ImageError, match="not in the allowed hosts"):
        ls_by_name.load(f"http://127.0.0.1:{ls.port}/data/upload/1/a.png")


def test_ipv6_literal_host(ls):
    try:
        server = Server("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        server.serve("/a.png", encode(rgb_image()))
        url = f"http://[0:0::1]:{server.port}/a.png"
        with pytest.raises(ImageError, match="loopback address"):
            loader(ls, allowed_hosts=("[::1]",)).load(url)
        assert server.requests == []
        assert loader(ls, allowed_hosts=("[::1]",), allow_private=True).load(url).shape == (6, 8, 3)
        assert server.requests[-1]["host"] == f"[::1]:{server.port}"
    finally:
        server.close()


def test_redirect_from_allow_listed_host_stays_on_that_host(ls, other, fake_dns):
    fake_dns.answers["images.example.test"] = ["127.0.0.2"]
    fake_dns.answers["cdn.example.test"] = ["127.0.0.2"]
    other.serve("/b.png", encode(rgb_image()))
    ld = loader(ls, allowed_hosts=("images.example.test", "cdn.example.test"), allow_private=True)
    other.routes["/same"] = lambda r: Response(status=302, headers={"Location": "/b.png"})
    assert ld.load(f"http://images.example.test:{other.port}/same").shape == (6, 8, 3)
    assert fake_dns.lookups == ["images.example.test"] * 2  # each hop is checked again
    for location in (f"http://cdn.example.test:{other.port}/b.png", f"http://127.0.0.2:{other.port}/b.png",
                     ls.url + "/data/upload/1/a.png", "http://169.254.169.254/"):
        other.routes["/away"] = lambda r, loc=location: Response(status=302, headers={"Location": loc})
        with pytest.raises(ImageError, match="redirect to another host"):
            ld.load(f"http://images.example.test:{other.port}/away")
    assert [r["path"] for r in other.requests] == ["/same", "/b.png"] + ["/away"] * 4
    assert ls.requests == []


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> Path:
    """A throw-away CA and a certificate for images.example.test (openssl CLI)."""
    assert shutil.which("openssl"), "the openssl CLI is needed to make the test certificates"
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=test CA", "-days", "2",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign", cwd=d)
    _openssl("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=images.example.test", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=DNS:images.example.test\nbasicConstraints=CA:FALSE\n"
                               "extendedKeyUsage=serverAuth\nauthorityKeyIdentifier=keyid\n")
    _openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "leaf.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    return d


def test_https_to_a_checked_address_verifies_the_host_name(ls, fake_dns, tls_files, monkeypatch):
    server = Server("127.0.0.2", ssl_context=(str(tls_files / "leaf.pem"), str(tls_files / "leaf.key")))
    try:
        server.serve("/a.png", encode(rgb_image()))
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_files / "ca.pem"))
        fake_dns.answers["images.example.test"] = ["127.0.0.2"]
        fake_dns.answers["other.example.test"] = ["127.0.0.2"]
        ld = loader(ls, allowed_hosts=("*.example.test",), allow_private=True)
        # connected to 127.0.0.2, yet the certificate (no IP in it) is checked for the name: SNI works
        assert ld.load(f"https://images.example.test:{server.port}/a.png").shape == (6, 8, 3)
        assert server.requests[-1]["host"] == f"images.example.test:{server.port}"
        with pytest.raises(ImageError, match="TLS certificate or handshake error"):
            ld.load(f"https://other.example.test:{server.port}/a.png")  # certificate is for another name
        with pytest.raises(ImageError, match="TLS certificate or handshake error"):
            loader(ls, allowed_hosts=("127.0.0.2",), allow_private=True).load(server.url + "/a.png")
        assert len(server.requests) == 1
    finally:
        server.close()


@pytest.mark.parametrize("host,expected", [
    ("Example.COM.", "example.com"), ("2130706433", "127.0.0.1"), ("0x7f.1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1"), ("127.0.1", "127.0.0.1"), ("0x7f000001", "127.0.0.1"),
    ("0", "0.0.0.0"), ("0x", "0.0.0.0"), ("127.0.0.0x", "127.0.0.0"), ("[::ffff:127.0.0.1]", "127.0.0.1"),
    ("::FFFF:7F00:1", "127.0.0.1"),
    ("[0:0::1]", "::1"), ("１２７。０。０。１", "127.0.0.1"), ("bücher.example", "xn--bcher-kva.example"),
    ("0x7f.evil", "0x7f.evil"), ("xn--bcher-kva.example", "xn--bcher-kva.example"),
])
def test_normalize_host(host, expected):
    assert normalize_host(host) == expected


@pytest.mark.parametrize("host", [
    "256.0.0.1", "1.2.3.4.5", "08.0.0.1", "0x100.0.0.1", "4294967296", "a..b", "", ".",
    "exa mple.com", "evil.com/", "[fe80::1%eth0]", "1.2.3.09", "0x1g.0.0.1", "evil.1",
])
def test_normalize_host_rejects(host):
    with pytest.raises(ValueError):
        normalize_host(host)


@pytest.mark.parametrize("address,private_ok", [
    ("8.8.8.8", True), ("2606:4700::1111", True), ("::ffff:8.8.8.8", True), ("64:ff9b::808:808", True),
    ("127.0.0.1", False), ("::1", False), ("10.0.0.1", False), ("100.64.0.1", False), ("fd12::1", False),
    ("::ffff:192.168.0.1", False),
])
def test_address_problem_allowed(address, private_ok):
    assert address_problem(address, allow_private=True) is None
    assert (address_problem(address) is None) == private_ok


@pytest.mark.parametrize("address", [
    "169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.0.1", "fe80::1", "0.0.0.0", "0.1.2.3", "::",
    "224.0.0.251", "ff02::1", "255.255.255.255", "240.0.0.1", "192.0.0.8", "192.0.2.5", "198.51.100.1",
    "203.0.113.9", "2001:db8::1", "fec0::1", "64:ff9b:1::1", "::ffff:169.254.169.254", "::169.254.169.254",
    "2002:a9fe:a9fe::", "2001:0:4136:e378:8000:63bf:3fff:fdd2", "2001:0:4136:e378:8000:63bf:f7f7:f7f7",
])
def test_address_problem_always_refused(address):
    assert address_problem(address, allow_private=True) is not None


def test_parse_allowed_hosts():
    assert parse_allowed_hosts(" Images.Example.com., cdn.example.com:8443,*.Example.org,,2130706433,[::1]:80 ") == (
        "images.example.com", "cdn.example.com:8443", "*.example.org", "127.0.0.1", "[::1]:80")
    for bad in ("https://images.example.com", "user@host", "*.com", "*.10.0.0.1", "host:0", "host:99999",
                "host:x", "exa mple.com", "[::1]x"):
        with pytest.raises(ValueError, match="allowed image host"):
            parse_allowed_hosts(bad)
    with pytest.raises(ValueError, match="allowed image host"):
        ImageFetcher(ImageSource(allowed_hosts=("https://bad/",)))


# ---- decoding ------------------------------------------------------------------


def test_exif_rotated_jpeg_is_transposed(ls):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)  # left half red
    a[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    ls.serve("/data/upload/1/photo.jpg", encode(Image.fromarray(a), "JPEG", exif=exif, quality=95), "image/jpeg")
    arr = loader(ls).load("/data/upload/1/photo.jpg")
    assert arr.shape == (40, 20, 3)
    assert arr[3, 10, 0] > 200 and arr[3, 10, 2] < 50  # top is the old left (red)
    assert arr[-4, 10, 2] > 200 and arr[-4, 10, 0] < 50  # bottom is the old right (blue)


def test_palette_png():
    im = rgb_image().quantize(16)
    assert im.mode == "P"
    np.testing.assert_array_equal(decode_image(encode(im), 10**6), np.asarray(im.convert("RGB")))


def test_palette_with_transparency_composited_on_white():
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    im.info["transparency"] = 0
    arr = decode_image(encode(im), 10**6)
    assert arr.tolist() == [[[255, 255, 255], [0, 255, 0]]]


def test_gray_png():
    g = np.array([[0, 100], [200, 255]], np.uint8)
    arr = decode_image(encode(Image.fromarray(g, "L")), 10**6)
    assert arr.shape == (2, 2, 3)
    for c in range(3):
        np.testing.assert_array_equal(arr[:, :, c], g)


def test_one_bit_png():
    im = Image.new("1", (3, 1))
    im.putpixel((1, 0), 1)
    arr = decode_image(encode(im), 10**6)
    assert arr[0, :, 0].tolist() == [0, 255, 0]


def test_rgba_composited_on_white():
    a = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [255, 0, 0, 128]]], np.uint8)
    arr = decode_image(encode(Image.fromarray(a, "RGBA")), 10**6)
    assert arr[0, 0].tolist() == [255, 255, 255]
    assert arr[0, 1].tolist() == [0, 0, 255]
    assert arr[0, 2, 0] == 255 and abs(int(arr[0, 2, 1]) - 127) <= 2 and abs(int(arr[0, 2, 2]) - 127) <= 2


def test_gray_alpha_png():
    la = Image.merge("LA", [Image.new("L", (1, 1), 0), Image.new("L", (1, 1), 0)])
    assert decode_image(encode(la), 10**6).tolist() == [[[255, 255, 255]]]


def test_16bit_png_scaled_by_actual_range():
    a = np.array([[1000, 2000], [3000, 5000]], np.uint16)
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    arr = decode_image(encode(im), 10**6)
    assert arr.dtype == np.uint8 and arr.shape == (2, 2, 3)
    assert arr[:, :, 0].tolist() == [[0, 64], [128, 255]]
    assert (arr[:, :, 0] == arr[:, :, 2]).all()


def test_32bit_int_tiff():
    a = np.array([[-5, 0, 5]], np.int32)
    arr = decode_image(encode(Image.fromarray(a, "I"), "TIFF"), 10**6)
    assert arr[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_jpeg():
    im = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    arr = decode_image(encode(im, "JPEG", quality=95), 10**6)
    assert arr.shape == (4, 4, 3)
    assert arr[0, 0, 0] > 200 and arr[0, 0, 1] < 60 and arr[0, 0, 2] < 60


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the check must not need it
def test_pixel_limit_refused_before_decoding(ls):
    ls.serve("/big.png", encode(rgb_image(20, 20)))
    with pytest.raises(ImageError, match="more than the limit of 100"):
        loader(ls, max_pixels=100).load("/big.png")
    # header claims 5000x5000 (under Pillow's own limit): refused by our check, never decoded
    with pytest.raises(ValueError, match="5000x5000"):
        decode_image(png_header_only(5000, 5000), 1_000_000)
    # over Pillow's MAX_IMAGE_PIXELS (~89.5 M): refused even if max_pixels is higher
    for side in (10_000, 100_000):
        with pytest.raises(ValueError, match="too large"):
            decode_image(png_header_only(side, side), 10**12)


def test_bomb_warning_is_an_error_outside_pytest():
    code = (
        "import warnings; from PIL import Image; import trainer.images;"
        "f = [x for x in warnings.filters if x[2] is Image.DecompressionBombWarning];"
        "assert f and f[0][0] == 'error', f"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_corrupt_bytes(ls):
    ls.serve("/junk.png", b"this is not an image at all")
    with pytest.raises(ImageError, match="not a recognizable image"):
        loader(ls).load("/junk.png")
    truncated = encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)))
    ls.serve("/truncated.png", truncated[: len(truncated) // 2])
    with pytest.raises(ImageError, match="corrupt image data"):
        loader(ls).load("/truncated.png")


def test_malformed_exif_is_ignored():
    exif = Image.Exif()
    exif[0x0112] = 99  # not a valid orientation
    data = encode(rgb_image(), "JPEG", exif=exif, quality=95)
    assert decode_image(data, 10**6).shape == (6, 8, 3)


def test_html_login_page_is_not_an_image(ls):
    ls.serve("/data/upload/1/a.png", b"<html><body>Login</body></html>", "text/html")
    with pytest.raises(ImageError, match="not a recognizable image"):
        loader(ls).load("/data/upload/1/a.png")


def test_redact_url():
    assert redact_url("https://user:pw@h.example:8443/a.png?X-Amz-Signature=abc&d=x#frag") == (
        "https://h.example:8443/a.png?X-Amz-Signature=***&d=x"
    )
    assert redact_url("data:image/png;base64,AAAA") == "data:image/png;base64,..."
    assert redact_url("/data/local-files/?d=dir/a.png") == "/data/local-files/?d=dir/a.png"
