"""ml_backend.fetch: task image URLs fetched from Label Studio (token kinds, presign, redirects, limits);
real HTTP on loopback only (127.0.0.1 and 127.0.0.2)."""
from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from werkzeug.wrappers import Response

from ml_backend import netpolicy
from ml_backend.fetch import ImageError, ImageFetcher, ImageSource

from tests.image_http import LEGACY, Server, encode, loader, make_jwt, rgb_image


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
