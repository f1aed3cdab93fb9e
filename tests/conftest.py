# ---------------------------------------------------------------------------
# Real Label Studio (1.23.2) end-to-end fixtures -- see tests/label_studio.py
# ---------------------------------------------------------------------------
import os
import shutil
import tempfile
from typing import Iterator

import pytest

# One ONNX export of the default encoder for the session (INFERENCE_RUNTIME=auto makes it when a backend starts):
# every backend the suite starts shares it, gunicorn ones through the environment, in-process ones through
# tests.backend_server.shared_exports(). tests/test_runtime_onnx.py exports into folders of its own.
os.environ["EXPORT_DIR"] = tempfile.mkdtemp(prefix="sam-backend-exports-")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(os.environ["EXPORT_DIR"], ignore_errors=True)

from tests.label_studio import SAM_LABEL_CONFIG, LabelStudioError, LabelStudioServer, start_label_studio


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """One real Label Studio per pytest session on a free 127.0.0.1 port (fails if not installed)."""
    try:
        with start_label_studio(tmp_path_factory.mktemp("label-studio-data")) as server:
            yield server
    except LabelStudioError as e:
        raise pytest.fail.Exception(f"could not start Label Studio: {e}", pytrace=False) from None


@pytest.fixture
def ls_project(label_studio: LabelStudioServer, request: pytest.FixtureRequest) -> int:
    """A fresh project (SAM_LABEL_CONFIG: box/mask/"nucleus") on the session server."""
    return label_studio.create_project(f"e2e {request.node.name}"[:50], SAM_LABEL_CONFIG)
# --------------------------- end Label Studio fixtures ---------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server for the module's tests (fails if it is not installed)."""
    from tests.services import redis_server

    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def pytest_collection_modifyitems(items: list) -> None:
    """The Docker stack test runs last: the networks it makes and removes must not change the host's network
    under a browser test (Chromium fails a page load with ERR_NETWORK_CHANGED)."""
    items.sort(key=lambda item: item.path.name == "test_compose_stack.py")  # stable: the rest keep their order


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (request.node.report_call) for fixtures that act on failure."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


# ---------------------------------------------------------------------------
# Model fixtures: the real offline default weights, loaded once per session
# ---------------------------------------------------------------------------
from trainer.models import LoadedModel, load_model  # noqa: E402
from trainer.runtime import Segmenter  # noqa: E402


@pytest.fixture(scope="session")
def lite_medsam() -> LoadedModel:
    return load_model("lite_medsam")


@pytest.fixture(scope="session")
def segmenter(lite_medsam: LoadedModel) -> Segmenter:
    return Segmenter(lite_medsam)


# ---------------------------------------------------------------------------
# Loopback only: no test process connects anywhere but 127.0.0.0/8 and ::1
# ---------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Refuse (and fail the test on) any connection from this process outside loopback, e.g. to a cloud
    metadata address a refusal test names, should the refusal ever regress. Unix sockets are not affected."""
    import ipaddress
    import socket

    attempts: list[str] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def allowed(address: object) -> bool:
        if not isinstance(address, tuple):
            return True
        try:
            ip = ipaddress.ip_address(str(address[0]).split("%")[0])
        except ValueError:
            return False  # a host name: the code under test should have resolved and checked it
        mapped = getattr(ip, "ipv4_mapped", None)
        return ip.is_loopback or bool(mapped and mapped.is_loopback)

    def guard(real):
        def connect(sock: socket.socket, address: object):
            if not allowed(address):
                attempts.append(str(address))
                raise ConnectionRefusedError(f"test guard: no connection outside loopback ({address})")
            return real(sock, address)
        return connect

    monkeypatch.setattr(socket.socket, "connect", guard(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guard(real_connect_ex))
    yield
    assert not attempts, f"the test tried to connect outside loopback: {attempts}"


@pytest.fixture(autouse=True, scope="session")
def no_proxy_for_loopback() -> Iterator[None]:
    """requests (and child processes) must not send 127.0.0.1 traffic to a proxy from the environment."""
    import os

    saved = {key: os.environ.get(key) for key in ("NO_PROXY", "no_proxy")}
    loopback = "127.0.0.1,localhost,::1,127.0.0.2"
    for key, value in saved.items():
        os.environ[key] = f"{value},{loopback}" if value else loopback
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# ---------------------------------------------------------------------------
# HTTP stand-ins for image fetching (tests/image_http.py): servers on 127.0.0.1 / 127.0.0.2, fake DNS
# ---------------------------------------------------------------------------
@pytest.fixture
def ls():
    """A tiny HTTP server on 127.0.0.1 playing Label Studio."""
    from tests.image_http import Server

    server = Server("127.0.0.1")
    yield server
    server.close()


@pytest.fixture
def other():
    """Another host: a tiny HTTP server on 127.0.0.2."""
    from tests.image_http import Server

    server = Server("127.0.0.2")
    yield server
    server.close()


@pytest.fixture
def fake_dns(monkeypatch):
    """socket.getaddrinfo answering made-up names from .answers (never a real lookup)."""
    import socket

    from tests.image_http import FakeDNS

    dns = FakeDNS(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    return dns


@pytest.fixture
def no_connect(monkeypatch):
    """Any outgoing connection attempt fails the test loudly; yields the list of attempts."""
    import socket

    import urllib3.util.connection

    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"connection attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib3.util.connection, "create_connection", refuse)
    return attempts
