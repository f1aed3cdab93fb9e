"""The SSRF rules (ml_backend.netpolicy) as ImageFetcher applies them: host normalisation, address checks,
allow-list, redirects, pinned connections. Made-up host names (``*.example.test``) are answered by a fake
resolver (``fake_dns``) that never does a real DNS lookup; tests of refused addresses outside loopback make any
connection attempt fail loudly (``no_connect``), so the refusal must come from the address check."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import urllib3.util.connection
from werkzeug.wrappers import Response

from ml_backend.fetch import ImageError, ImageFetcher, ImageSource
from ml_backend.netpolicy import address_problem, normalize_host, parse_allowed_hosts

from tests.image_http import LEGACY, Server, encode, loader, rgb_image


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
