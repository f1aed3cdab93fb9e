"""Tests for ml_backend.auth on a tiny Flask app (no model)."""

from __future__ import annotations

import base64
import hmac
import logging

import pytest
from flask import Flask, jsonify

from ml_backend import auth
from ml_backend.auth import install_auth
from ml_backend.logs import JsonFormatter

USER = "labelstudio"
PASSWORD = "pä:ss-w0rd/very-secret"  # a colon and non-ASCII: both legal in basic auth passwords
TOKEN = "tok-0123456789abcdef-secret"
SECRETS = (PASSWORD, TOKEN, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())


def make_app(user=USER, password=PASSWORD, token=TOKEN) -> Flask:
    app = Flask("auth-test")

    @app.get("/health")
    def health():
        return jsonify(status="UP")

    @app.get("/")
    def index():
        return jsonify(status="UP")

    @app.post("/predict")
    def predict():
        return jsonify(results=[])

    @app.post("/setup")
    def setup():
        return jsonify(model_version="v1")

    install_auth(app, user, password, token)
    return app


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def client():
    return make_app().test_client()


def test_health_is_open(client):
    assert client.get("/health").status_code == 200
    assert client.get("/health", headers=bearer("wrong")).status_code == 200


@pytest.mark.parametrize("path,method", [("/", "get"), ("/predict", "post"), ("/setup", "post"),
                                         ("/nope", "get"), ("/health/", "get"), ("/HEALTH", "get")])
def test_other_routes_need_credentials(client, path, method):
    response = getattr(client, method)(path, json={})
    assert response.status_code == 401
    assert response.get_json() == {"error": "authentication required"}
    challenges = response.headers.getlist("WWW-Authenticate")
    assert challenges == ['Basic realm="label-studio-ml-backend", charset="UTF-8"',
                          'Bearer realm="label-studio-ml-backend"']


@pytest.mark.parametrize("headers", [
    basic(USER, "wrong"), basic("someone", PASSWORD), basic(USER, PASSWORD[:-1]), basic(USER, ""),
    basic("", ""), bearer("wrong"), bearer(TOKEN[:-1]), bearer(""), bearer(TOKEN + "x"),
    {"Authorization": f"Token {TOKEN}"}, {"Authorization": TOKEN}, {"Authorization": "Basic !!!notbase64"},
    {"Authorization": "Basic " + base64.b64encode(USER.encode()).decode()},  # no colon
    {"Authorization": f"Basic {PASSWORD}"}, {"Authorization": f"Bearer {PASSWORD}"},
])
def test_wrong_credentials_are_refused(client, headers):
    response = client.post("/predict", json={}, headers=headers)
    assert response.status_code == 401
    assert response.get_json() == {"error": "invalid credentials"}
    assert response.headers.getlist("WWW-Authenticate")


@pytest.mark.parametrize("headers", [
    basic(USER, PASSWORD), bearer(TOKEN), {"Authorization": f"bearer   {TOKEN}"},
    {"Authorization": "BASIC " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()},
])
def test_right_credentials_pass(client, headers):
    assert client.post("/predict", json={}, headers=headers).status_code == 200
    assert client.get("/", headers=headers).status_code == 200


def test_basic_only_and_token_only():
    basic_only = make_app(token=None).test_client()
    assert basic_only.post("/predict", headers=basic(USER, PASSWORD)).status_code == 200
    response = basic_only.post("/predict", headers=bearer(TOKEN))
    assert response.status_code == 401
    assert response.headers.getlist("WWW-Authenticate") == ['Basic realm="label-studio-ml-backend", charset="UTF-8"']

    token_only = make_app(user=None, password=None).test_client()
    assert token_only.post("/predict", headers=bearer(TOKEN)).status_code == 200
    response = token_only.post("/predict", headers=basic(USER, PASSWORD))
    assert response.status_code == 401
    assert response.headers.getlist("WWW-Authenticate") == ['Bearer realm="label-studio-ml-backend"']


def test_nothing_configured_leaves_the_app_open():
    for empty in (None, ""):
        client = make_app(user=empty, password=empty, token=empty).test_client()
        assert client.post("/predict").status_code == 200


def test_user_without_password_is_a_configuration_error():
    with pytest.raises(ValueError, match="BASIC_AUTH_USER and BASIC_AUTH_PASS"):
        make_app(user=USER, password=None, token=None)
    with pytest.raises(ValueError, match="BASIC_AUTH_USER and BASIC_AUTH_PASS"):
        make_app(user=None, password=PASSWORD, token=TOKEN)


def test_comparisons_are_constant_time(client, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    client.post("/predict", headers=basic("someone", "wrong"))
    assert len(calls) == 2  # the password is compared even though the user is wrong
    client.post("/predict", headers=bearer("wrong"))
    assert len(calls) == 3
    assert all(t == (bytes, bytes) for t in calls)


def test_credentials_never_appear_in_logs(client, caplog):
    caplog.set_level(logging.DEBUG)
    attempts = [basic(USER, PASSWORD), bearer(TOKEN), basic(USER, PASSWORD + "x"), bearer(TOKEN + "x"),
                basic(PASSWORD, TOKEN), {"Authorization": f"Token {TOKEN}"}, {"Authorization": PASSWORD}]
    for headers in attempts:
        client.post("/predict", json={}, headers=headers)
        client.get("/nope", headers=headers)
    failures = [r for r in caplog.records if r.getMessage() == "authentication failed"]
    assert len(failures) == 10 and failures[0].path == "/predict" and failures[0].scheme == "basic"
    for record in caplog.records:
        dump = repr(record.__dict__) + record.getMessage() + JsonFormatter().format(record)
        for secret in SECRETS + (PASSWORD + "x", TOKEN + "x"):
            assert secret not in dump
    assert not any(secret in caplog.text for secret in SECRETS)


def test_refusal_body_has_no_credentials(client):
    response = client.post("/predict", headers=basic(USER, PASSWORD + "x"))
    body = response.get_data(as_text=True)
    assert PASSWORD not in body and TOKEN not in body
