"""Tests for ml_backend.images; real HTTP on loopback only (127.0.0.1 and 127.0.0.2)."""

from __future__ import annotations

import base64
import io
import json
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
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from ml_backend.images import ImageError, ImageLoader, ImageSource, decode_image, redact_url

LEGACY = "legacytoken0123456789abcdef"


# ---- helpers -------------------------------------------------------------------


class Server:
    """A tiny threaded HTTP server; ``routes`` maps a path to ``handler(request) -> Response``."""

    def __init__(self, host: str) -> None:
        self.routes: dict[str, Callable[[Request], Response]] = {}
        self.requests: list[dict] = []
        self._srv = make_server(host, 0, self._app, threaded=True)
        self.url = f"http://{host}:{self._srv.server_port}"
        threading.Thread(target=self._srv.serve_forever, args=(0.02,), daemon=True).start()

    @Request.application
    def _app(self, request: Request) -> Response:
        self.requests.append(
            {"method": request.method, "path": request.path, "args": dict(request.args),
             "auth": request.headers.get("Authorization"), "body": request.get_data()}
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


def encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def make_jwt(claims: dict) -> str:
    def b64(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64(claims)}.c2lnbmF0dXJl"


def loader(ls: Server | None = None, **kwargs) -> ImageLoader:
    kwargs.setdefault("token", LEGACY)
    kwargs.setdefault("timeout_s", 5.0)
    return ImageLoader(ImageSource(label_studio_url=ls.url if ls else None, **kwargs))


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


def test_absolute_url_on_label_studio_host_gets_token(ls):
    ls.serve("/data/upload/1/a.png", encode(rgb_image()))
    loader(ls).load(ls.url + "/data/upload/1/a.png")
    assert ls.requests[-1]["auth"] == f"Token {LEGACY}"


def test_token_not_sent_to_foreign_host(ls, other):
    other.serve("/pics/a.png", encode(rgb_image()))
    arr = loader(ls).load(other.url + "/pics/a.png")
    assert arr.shape == (6, 8, 3)
    assert other.requests[-1]["auth"] is None
    assert ls.requests == []


def test_other_port_on_same_host_is_foreign(ls):
    # same host, different port: a different origin, so no token
    second = Server("127.0.0.1")
    try:
        second.serve("/a.png", encode(rgb_image()))
        loader(ls).load(second.url + "/a.png")
        assert second.requests[-1]["auth"] is None
    finally:
        second.close()


def test_allowed_hosts_restricts_plain_urls(ls, other):
    other.serve("/a.png", encode(rgb_image()))
    with pytest.raises(ImageError, match="not in the allowed hosts"):
        loader(ls, allowed_hosts=("images.example.org",)).load(other.url + "/a.png")
    assert other.requests == []
    loader(ls, allowed_hosts=("127.0.0.2",)).load(other.url + "/a.png")
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


def test_cloud_uri_resolved_through_presign(ls, other):
    other.serve("/bucket/key.png", encode(rgb_image()))
    uri = "s3://bucket/dir/key.png"

    def presign(request):
        assert base64.urlsafe_b64decode(request.args["fileuri"]).decode() == uri
        signed = other.url + "/bucket/key.png?X-Amz-Signature=secret"
        return Response(status=303, headers={"Location": signed})

    ls.routes["/tasks/7/presign/"] = presign
    assert loader(ls).load(uri, task_id=7).shape == (6, 8, 3)
    assert ls.requests[-1]["auth"] == f"Token {LEGACY}"
    assert other.requests[-1]["auth"] is None
    assert other.requests[-1]["args"] == {"X-Amz-Signature": "secret"}


def test_cloud_uri_needs_task_id(ls):
    with pytest.raises(ImageError, match="task id"):
        loader(ls).load("gs://bucket/a.png")


def test_cloud_uri_error_hides_signature(ls, other):
    ls.routes["/tasks/7/presign/"] = lambda r: Response(
        status=303, headers={"Location": other.url + "/gone.png?sig=topsecret"})
    with pytest.raises(ImageError, match="HTTP 404") as info:
        loader(ls).load("azure-blob://container/gone.png", task_id=7)
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
        "import warnings; from PIL import Image; import ml_backend.images;"
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
