"""gunicorn's settings, from the backend's own (ml_backend/settings.py, the README's table): BIND, or PORT on
127.0.0.1 (every interface once BASIC_AUTH_* or AUTH_TOKEN is set), WORKERS, THREADS, TIMEOUT; its own log
lines in the backend's format (LOG_LEVEL, LOG_FORMAT)."""
from ml_backend.logs import gunicorn_config
from ml_backend.settings import Settings

_settings = Settings.from_env()

bind = _settings.listen
workers = _settings.workers
threads = _settings.threads
timeout = _settings.worker_timeout_s
worker_class = "gthread"
accesslog = None  # the app logs one structured line per request itself
logconfig_dict = gunicorn_config(_settings.log_level, _settings.log_format)
# gunicorn >= 25.1 opens a control socket at one per-user path ($HOME/.gunicorn/gunicorn.ctl) that every
# instance on the host shares; nothing here uses it
control_socket_disable = True


def when_ready(server) -> None:
    """One line saying who can reach the backend, before the workers load the model."""
    public = not _settings.listen.startswith(("127.", "localhost", "[::1]"))
    server.log.info("listening", extra={"bind": _settings.listen, "workers": workers, "auth": _settings.auth_required,
                                        "reachable_from": "other hosts" if public else "this host only (set BIND "
                                        "or BASIC_AUTH_USER/BASIC_AUTH_PASS to accept other hosts)"})
