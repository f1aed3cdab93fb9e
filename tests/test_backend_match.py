"""Recognising this backend under any spelling of its URL: MODEL_DIR's instance id (one per deployment, however
many processes start at once), /health's id when both URLs answer, else scheme, host, port and path."""
from __future__ import annotations

import json
import multiprocessing
import socket
from pathlib import Path

from werkzeug.wrappers import Response

from ml_backend.backend_match import BackendMatcher, Endpoint, instance_id, same_host, webhook_base
from tests.image_http import Server


def _read_id(model_dir: str, start, out) -> None:
    start.wait()
    out.put(instance_id(Path(model_dir)))


def test_every_process_on_a_model_dir_gets_one_instance_id(tmp_path):
    context = multiprocessing.get_context("fork")
    start, out = context.Event(), context.Queue()
    processes = [context.Process(target=_read_id, args=(str(tmp_path / "models"), start, out)) for _ in range(8)]
    for process in processes:
        process.start()
    start.set()
    ids = {out.get(timeout=30) for _ in processes}
    for process in processes:
        process.join(30)
    assert len(ids) == 1 and None not in ids
    assert instance_id(tmp_path / "models") in ids  # read back, never replaced
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["instance-id"]  # no temporary left
    assert instance_id(tmp_path / "elsewhere") not in ids
    (tmp_path / "file").write_text("")
    assert instance_id(tmp_path / "file" / "models") is None  # MODEL_DIR unusable: no id, no crash


def test_endpoints_compare_scheme_host_port_and_path():
    assert Endpoint.parse("http://LocalHost:9090/") == Endpoint.parse("http://localhost:9090")
    assert Endpoint.parse("http://a") == Endpoint.parse("http://a:80/")
    assert Endpoint.parse("https://a").port == 443 and Endpoint.parse("http://a/ml/").path == "/ml"
    assert Endpoint.parse("ftp://a") is None and Endpoint.parse("not a url") is None
    assert Endpoint.parse("http://a:99999") is None
    assert webhook_base("http://a:1/webhook/") == "http://a:1" and webhook_base("http://a:1/hook") is None
    assert same_host("localhost", "127.0.0.1") and same_host(socket.gethostname(), "localhost")
    assert not same_host("localhost", "192.0.2.1")  # TEST-NET-1: not an address of this machine (no lookup)


def _backend(instance: str | None) -> Server:
    server = Server("127.0.0.1")
    body = {"status": "UP", **({"instance": instance} if instance else {})}
    server.routes["/health"] = lambda request: Response(json.dumps(body), content_type="application/json")
    return server


def test_the_instance_id_decides_when_both_urls_answer_it():
    ours, other, old = _backend("id-ours"), _backend("id-other"), _backend(None)
    try:
        matcher = BackendMatcher(f"http://localhost:{ours.port}/")
        assert matcher.identity == "id-ours"
        assert matcher.same(f"http://localhost:{ours.port}") == "the same URL"
        assert matcher.same(f"http://127.0.0.1:{ours.port}/") == "the same instance id"
        assert matcher.same(f"http://{socket.gethostname()}:{ours.port}") == "the same instance id"
        assert matcher.same(other.url) is None  # another backend on this machine
        assert matcher.same(old.url) is None  # answers no id: another port, so another backend
        assert matcher.same(f"http://127.0.0.1:{ours.port}/ml") is None  # another path
        asked = len(ours.requests)
        matcher.same(f"http://127.0.0.1:{ours.port}/")
        assert len(ours.requests) == asked  # each URL's /health is asked once
    finally:
        for server in (ours, other, old):
            server.close()


def test_without_ids_the_same_host_port_and_path_match():
    with socket.socket() as probe:  # a port nothing listens on: no /health answers
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    matcher = BackendMatcher(f"http://localhost:{port}")
    assert matcher.identity is None
    assert matcher.same(f"http://127.0.0.1:{port}/") == "the same host, port and path"
    assert matcher.same(f"http://127.0.0.1:{port + 1}") is None
    assert matcher.same(f"https://127.0.0.1:{port}") is None
    assert matcher.same("") is None and matcher.same("ftp://localhost") is None
