"""Property-based fuzzing of /setup, /predict and /webhook: never a 5xx, the server stays correct."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from ml_backend.app import create_app
from ml_backend.backend import SamBackend
from ml_backend.settings import Settings
from tests import fuzzing

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    config = Settings(model_dir=tmp_path_factory.mktemp("fuzz-models"), label_studio_url="http://127.0.0.1:9",
                      label_studio_api_key="fuzz-token", training_runner="off", image_timeout_s=1)
    return create_app(config, SamBackend(config)).test_client()


def _check(response) -> None:
    assert response.status_code < 500, response.get_data(as_text=True)[:500]
    assert response.is_json, response.get_data(as_text=True)[:200]


@FUZZ
@given(body=fuzzing.predict_bodies)
def test_predict_never_5xx(client, body):
    response = client.post("/predict", json=body)
    _check(response)
    if response.status_code == 200 and isinstance(body, dict) and isinstance(body.get("tasks"), list):
        assert len(response.get_json()["results"]) == len(body["tasks"])


@FUZZ
@given(body=fuzzing.setup_bodies)
def test_setup_never_5xx(client, body):
    _check(client.post("/setup", json=body))


@FUZZ
@given(body=fuzzing.webhook_bodies)
def test_webhook_never_5xx(client, body):
    _check(client.post("/webhook", json=body))


def test_still_correct_after_fuzzing(client):
    assert client.get("/health").get_json()["status"] == "UP"
    assert client.post("/setup", json={"project": "1.1"}).get_json()["model_version"].endswith("@base")
