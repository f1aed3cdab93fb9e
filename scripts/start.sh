#!/usr/bin/env bash
# Install (first run) and start the backend on the offline default model (LiteMedSAM) on port 9090.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/gunicorn -c ml_backend/gunicorn_conf.py ml_backend.wsgi:app
