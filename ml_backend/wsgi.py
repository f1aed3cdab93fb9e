"""gunicorn entry point: `gunicorn --bind 0.0.0.0:9090 ml_backend.wsgi:app` (settings from the environment)."""
from .app import create_app
from .logs import configure
from .settings import Settings

settings = Settings.from_env()
configure(settings.log_level)
app = create_app(settings)
