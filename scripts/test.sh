#!/usr/bin/env bash
# Install everything the tests need (backend venv, Label Studio 1.23.2 in its own venv, redis-server,
# docker-compose, and Debian's chromium for the browser tests)
# and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
if [ ! -x .ls-venv/bin/label-studio ]; then
  rm -rf .ls-venv
  python3 -m venv .ls-venv
  quiet .ls-venv/bin/pip install -q label-studio==1.23.2
fi
missing=""
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v docker-compose >/dev/null 2>&1 || missing="$missing docker-compose"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
if [ -n "$missing" ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq $missing) >/dev/null 2>&1 || echo "warning: could not install:$missing" >&2
fi
exec .venv/bin/python -m pytest "$@"
