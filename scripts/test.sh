#!/usr/bin/env bash
# Install everything the tests need (backend venv, Label Studio 1.23.2 in its own venv, redis-server,
# Debian's chromium for the browser tests, and a Docker engine with docker-compose and debootstrap for the
# docker-compose stack test), start the Docker engine if none runs, and run the whole test suite. Extra
# arguments go to pytest. A dockerd started here is stopped when the suite ends.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --dev  # the serving requirements and the tests' tools (requirements-dev.txt)
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
if [ ! -x .ls-venv/bin/label-studio ]; then
  rm -rf .ls-venv
  python3 -m venv .ls-venv
  quiet .ls-venv/bin/pip install -q -r requirements-label-studio.txt  # Label Studio 1.23.2, every dependency pinned
fi
missing=""
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v dockerd >/dev/null 2>&1 || missing="$missing docker.io"
command -v docker-compose >/dev/null 2>&1 || missing="$missing docker-compose"
command -v debootstrap >/dev/null 2>&1 || missing="$missing debootstrap"
if [ -n "$missing" ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq $missing) >/dev/null 2>&1 || echo "warning: could not install:$missing" >&2
fi

# The Docker engine starts once, before the suite: its bridge appears now, not under a browser test.
dockerd_pid=""
stop_dockerd() {
  if [ -n "$dockerd_pid" ]; then
    kill "$dockerd_pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.5; done
  fi
}
if command -v dockerd >/dev/null 2>&1 && ! docker info >/dev/null 2>&1; then
  mkdir -p test-artifacts
  dockerd > test-artifacts/dockerd.log 2>&1 &
  dockerd_pid=$!
  trap stop_dockerd EXIT
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || echo "warning: dockerd did not start (test-artifacts/dockerd.log)" >&2
fi
.venv/bin/python -m pytest "$@"
