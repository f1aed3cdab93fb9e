"""gunicorn settings from the environment: BIND, WORKERS, THREADS, TIMEOUT (see README)."""
import os

bind = os.environ.get("BIND", "0.0.0.0:9090")
workers = int(os.environ.get("WORKERS", "1"))
threads = int(os.environ.get("THREADS", "16"))  # cheap: PREDICT_CONCURRENCY bounds the compute; the rest serve webhooks
timeout = int(os.environ.get("TIMEOUT", "300"))  # LS waits up to 100 s for a prediction batch
worker_class = "gthread"
accesslog = None  # the app logs one structured line per request itself
