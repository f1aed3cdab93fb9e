#!/usr/bin/env bash
# Install (first run: scripts/install.sh) and start the backend with gunicorn on the offline default model
# (LiteMedSAM), with the settings of the environment (README, "Settings"). Where it listens:
#   BIND (host:port) when set, e.g. BIND=0.0.0.0:9090 for a Label Studio on another host;
#   else PORT (default 9090) on 127.0.0.1 (this host only) while the backend asks for no credentials,
#   on 0.0.0.0 once BASIC_AUTH_USER + BASIC_AUTH_PASS or AUTH_TOKEN are set.
#   PORT=9191 scripts/start.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/gunicorn -c ml_backend/gunicorn_conf.py ml_backend.wsgi:app
