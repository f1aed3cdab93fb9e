"""Flask app speaking Label Studio's ML-backend protocol: /health, /, /setup, /predict (and /webhook)."""
from __future__ import annotations

import logging
import sqlite3
import time

from flask import Flask, Response, g, jsonify, request
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

from . import protocol
from .auth import install_auth
from .backend_match import instance_id
from .backend import SamBackend
from .settings import Settings
from .shutdown import stop_at_exit
from .webhooks import parse_new_tasks, parse_webhook
from .training import Training

log = logging.getLogger("ml_backend.http")


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise protocol.ProtocolError("request body must be a JSON object")
    return body


def _reason(response: Response) -> str | None:
    """The `error` of a JSON error answer (every 4xx of this app has one), else its status text."""
    body = response.get_json(silent=True) if response.is_json else None
    return body.get("error") if isinstance(body, dict) and body.get("error") else response.status


def create_app(settings: Settings | None = None, backend: SamBackend | None = None,
               training: Training | None = None) -> Flask:
    """Build the app; the model is loaded here, once per process (gunicorn: once per worker)."""
    settings = settings or Settings.from_env()
    backend = backend or SamBackend(settings)
    training = training or Training(settings)
    instance = instance_id(settings.model_dir)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_body_mb * 1024 * 1024)

    @app.before_request
    def start_timer() -> None:
        g.started = time.perf_counter()
        g.log = {}

    @app.after_request
    def log_request(response: Response) -> Response:
        fields = {"method": request.method, "path": request.path, "status": response.status_code,
                  "ms": round(1000 * (time.perf_counter() - g.get("started", time.perf_counter())), 1),
                  **g.get("log", {})}
        if 400 <= response.status_code < 500:  # Label Studio shows only "see the ML backend's logs": say why here
            fields["error"] = _reason(response)
        log.log(logging.WARNING if response.status_code >= 400 else logging.INFO, "request", extra=fields)
        return response

    install_auth(app, settings.basic_auth_user, settings.basic_auth_pass, settings.auth_token)

    @app.errorhandler(protocol.ProtocolError)
    def bad_request(exc: protocol.ProtocolError):
        return jsonify(error=str(exc)), 400

    @app.errorhandler(sqlite3.Error)
    def store_unavailable(exc: sqlite3.Error):
        log.error("job store unavailable", extra={"error": str(exc)})
        return jsonify(error=f"the event could not be recorded ({exc}); retry later"), 503

    @app.errorhandler(RedisError)
    def redis_unavailable(exc: RedisError):  # REDIS_URL: Redis holds the job records
        log.error("job store unavailable", extra={"error": str(exc)})
        return jsonify(error=f"the event could not be recorded ({type(exc).__name__}); retry later"), 503

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return jsonify(error=exc.description or exc.name), exc.code

    @app.errorhandler(Exception)
    def server_error(exc: Exception):
        log.exception("unhandled error", extra={"path": request.path})
        return jsonify(error=f"internal error: {type(exc).__name__}"), 500

    @app.get("/health")
    def health():  # instance: MODEL_DIR's id, by which `connect` recognises this backend under any URL
        return jsonify(status="UP", model_class="SamBackend", model=backend.segmenter.model.identity,
                       instance=instance)

    @app.get("/")
    def index():
        return jsonify(status="UP", model_class="SamBackend", model_version=backend.model_version(None),
                       endpoints=["/health", "/setup", "/predict", "/webhook", "/versions", "/prewarm", "/prelabel",
                                  "/train/status"])

    @app.post("/setup")
    def setup():
        body = _json_body()
        project = protocol.project_id(body.get("project"))
        if body.get("schema"):
            protocol.parse_label_config(body["schema"])
        version = backend.setup(project, body.get("hostname"), body.get("access_token"))
        g.log = {"project": project, "model_version": version}
        return jsonify(model_version=version)

    @app.post("/predict")
    def predict():
        query = protocol.parse_predict_request(request.get_json(silent=True), settings.max_tasks)
        answer = backend.predict(query)
        g.log = {"project": query.project, "tasks": len(query.tasks), "interactive": query.interactive,
                 "answered": answer.answered, "deferred": answer.deferred, "failed": answer.failed,
                 "no_boxes": answer.without_boxes}
        return jsonify(results=protocol.results(answer.answers, query.config, answer.model_version),
                       model_version=backend.model_version(query.project))

    @app.post("/webhook")
    def webhook():
        body = _json_body()
        new_tasks = parse_new_tasks(body)
        if new_tasks is not None:
            queued = backend.prewarm_tasks(new_tasks.project, new_tasks.images, soon=True)
            g.log = {"action": "TASKS_CREATED", "project": new_tasks.project, "tasks": new_tasks.tasks,
                     "prewarm_queued": queued}
            return jsonify(status="prewarming", queued=queued)
        event = parse_webhook(body)
        if event is None:
            g.log = {"action": body.get("action"), "ignored": True}
            return jsonify(status="ignored")
        event_id, job_id = training.record(event.project, event.action, event.annotations, event.key, event.explicit)
        if event_id is None:  # the same annotation state through a second webhook to this backend
            g.log = {"action": event.action, "project": event.project, "duplicate": True}
            return jsonify(status="duplicate")
        g.log = {"action": event.action, "project": event.project, "event_id": event_id, "job": job_id}
        return jsonify(status="recorded", event=event_id, job=job_id)

    @app.get("/versions")
    def versions():
        """Label Studio 1.23's model-versions list (it sends no project): the served model_version of every
        project (or of ?project=<id>) and every version kept, as model_version strings, base first."""
        project = protocol.project_id(request.args.get("project"))
        return jsonify(versions=training.model_versions(backend.segmenter, project),
                       model_version=backend.model_version(project))

    @app.post("/prewarm")
    def prewarm():
        project = protocol.project_id(_json_body().get("project"))
        if project is None:
            raise protocol.ProtocolError('give {"project": <id>}')
        started = backend.prewarm_project(project, every_s=0)
        g.log = {"project": project, "started": started}
        return jsonify(status="prewarming" if started else "off", project=project, **backend.prewarmer.status())

    @app.post("/prelabel")
    def prelabel():
        project = protocol.project_id(_json_body().get("project"))
        if project is None:
            raise protocol.ProtocolError('give {"project": <id>}')
        job_id, new = training.prelabel(project)
        g.log = {"project": project, "job": job_id, "new": new}
        return jsonify(status="queued", job=job_id, runner=settings.runner), 202

    @app.get("/prewarm/status")
    def prewarm_status():
        return jsonify(backend.prewarmer.status())

    @app.get("/train/status")
    def train_status():
        project = protocol.project_id(request.args.get("project"))
        if project is None:
            raise protocol.ProtocolError("give ?project=<id>")
        status = training.status(project)
        status["model_version"] = backend.model_version(project)
        return jsonify(status)

    stop_at_exit(backend)
    model = backend.segmenter.model
    logging.getLogger("ml_backend").info("ready", extra={
        "model": model.identity, "variant": model.variant, "device": str(model.device),
        "model_version": backend.model_version(None), "runner": settings.runner, "settings": settings.loggable()})
    return app
