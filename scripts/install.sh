#!/usr/bin/env bash
# Idempotent install of the backend's virtualenv (.venv) from requirements.txt: what serving and training need.
#   scripts/install.sh          the serving requirements (what scripts/start.sh runs)
#   scripts/install.sh --dev    also the tests' tools, requirements-dev.txt (what scripts/test.sh runs)
# PYTHON: the interpreter (default python3; Python 3.11 or newer). On Linux, PyPI's torch is its CUDA build: the
# virtualenv is ~6 GB, most of it CUDA libraries (README, "Install size"). TORCH_INDEX_URL (e.g.
# https://download.pytorch.org/whl/cpu) installs torch and torchvision from that index first, as the docker image does.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
requirements=requirements.txt
case "${1:-}" in
  "") ;;
  --dev) requirements=requirements-dev.txt ;;
  *) echo "usage: scripts/install.sh [--dev]" >&2; exit 2 ;;
esac
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1  # browser tests use Debian's chromium, never a downloaded one
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: $PYTHON not found. Install Python 3.11 (Debian/Ubuntu: apt-get install python3.11 python3.11-venv)" \
       "or point PYTHON at one: PYTHON=/usr/bin/python3.11 $0" >&2
  exit 1
fi
version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: $PYTHON is Python $version; the backend needs 3.11 or newer (its pinned numpy/scipy/torch wheels)." \
       "Install python3.11 and run: PYTHON=python3.11 $0" >&2
  exit 1
fi
[ "$version" = "3.11" ] || echo "note: Python $version; the pins are tested with 3.11 (if pip finds no wheel for one," \
                                 "use PYTHON=python3.11)" >&2

if [ ! -x .venv/bin/python ] || [ ! -x .venv/bin/pip ]; then
  if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    echo "error: Python $version cannot create a virtualenv here: its venv/ensurepip modules are missing." \
         "On Debian/Ubuntu install them: sudo apt-get install python$version-venv (or python3-venv)" >&2
    exit 1
  fi
  "$PYTHON" -m venv --clear .venv  # --clear: a virtualenv left without pip by an earlier failed attempt
fi

stamp() {  # what an install was made from: the requirement files and the torch index
  cat requirements.txt
  [ "$requirements" = requirements.txt ] || cat "$requirements"
  echo "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}"
}
marker=".venv/.installed-$requirements"
if ! stamp | cmp -s - "$marker" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    grep -E '^(torch|torchvision)==' requirements.txt > .venv/.torch-requirements.txt
    quiet .venv/bin/pip install -q --index-url "$TORCH_INDEX_URL" -r .venv/.torch-requirements.txt
  fi
  quiet .venv/bin/pip install -q -r "$requirements"
  stamp > "$marker"
fi
