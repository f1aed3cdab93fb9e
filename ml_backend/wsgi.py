"""gunicorn's entry point: `gunicorn -c ml_backend/gunicorn_conf.py ml_backend.wsgi:app` (settings from the
environment). Logging is set up before the app's modules are imported, so that their import-time warnings are
logged lines too; once the model is loaded, the configured Label Studio key is checked in the background."""
import logging

from gunicorn.arbiter import Arbiter

from .logs import configure
from .settings import Settings

settings = Settings.from_env()
configure(settings.log_level, settings.log_format)

try:
    from .app import create_app  # after logging: importing it loads torch and the model code
    from .credentials import check_at_start

    app = create_app(settings)
except (Exception, SystemExit) as exc:  # a bad setting or checkpoint: one JSON line, not gunicorn's bare print
    if isinstance(exc, SystemExit) and not isinstance(exc.code, str):
        raise  # an exit with a status, e.g. gunicorn's own on SIGINT while the model loads: not a failure of ours
    logging.getLogger("ml_backend").error("worker failed to start", exc_info=isinstance(exc, Exception),
                                          extra={"error": str(exc)})
    raise SystemExit(Arbiter.WORKER_BOOT_ERROR) from None  # gunicorn stops, instead of restarting workers forever
check_at_start(settings)
