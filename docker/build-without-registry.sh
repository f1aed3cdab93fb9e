#!/usr/bin/env bash
# Build, where no container registry can be reached, the images docker/docker-compose.yml would otherwise
# pull, from the Debian mirror apt already uses. Needs root, debootstrap and a running Docker engine.
#
#   local/debian:bookworm        debootstrap --variant=minbase + docker import (skipped when it exists)
#   local/python:3.11-bookworm   Debian's python3 (3.11) in a venv on it: BASE_IMAGE, for python:3.11-slim
#   local/label-studio:1.23.2    Label Studio 1.23.2 from PyPI on that (requirements-label-studio.txt):
#                                LABEL_STUDIO_IMAGE
#
# First it copies the CA bundle this host's pip trusts (pip config global.cert, or $PIP_CERT) to
# docker/certs/host-pip.crt, so pip inside every build here trusts it too. `--certs` does only that.
# Then set in docker/.env:
#   BASE_IMAGE=local/python:3.11-bookworm
#   LABEL_STUDIO_IMAGE=local/label-studio:1.23.2
#   TORCH_INDEX_URL=https://pypi.org/simple     # only if PyTorch's own index is unreachable too (CUDA wheels)
# DEBIAN_MIRROR overrides the mirror (default: the first Debian URI in /etc/apt/sources.list*); PIP_INDEX_URL,
# if set, is the package index Label Studio is installed from (default PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
export DOCKER_BUILDKIT=0  # the legacy builder: BuildKit needs buildx or a frontend image from a registry
DEBIAN_IMAGE=local/debian:bookworm
PYTHON_IMAGE=local/python:3.11-bookworm
LABEL_STUDIO_VERSION=$(sed -n 's/^label-studio==//p' requirements-label-studio.txt)
LABEL_STUDIO_IMAGE=local/label-studio:$LABEL_STUDIO_VERSION

copy_pip_ca() {
  local cert="${PIP_CERT:-}"
  if [ -z "$cert" ] && command -v pip3 >/dev/null 2>&1; then
    cert=$(pip3 config get global.cert 2>/dev/null || true)
  fi
  if [ -n "$cert" ] && [ -s "$cert" ]; then
    cp "$cert" docker/certs/host-pip.crt
    echo "docker/certs/host-pip.crt: pip's CA bundle ($cert)"
  fi
}

debian_mirror() {  # prints nothing (and succeeds) when apt names none: either sources file may be missing
  { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' || true
    grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
      | sed -E 's/^deb +(\[[^]]*\] +)?//' | awk '{print $1}' || true
  } | { grep -E '/debian/?$' || true; } | head -n1
}

copy_pip_ca
[ "${1:-}" = "--certs" ] && exit 0

if ! docker image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
  mirror=${DEBIAN_MIRROR:-$(debian_mirror)}
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  echo "debootstrap bookworm from $mirror"
  debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$mirror" >/dev/null
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import - "$DEBIAN_IMAGE" >/dev/null
  echo "$DEBIAN_IMAGE imported"
fi
docker build --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE" -t "$PYTHON_IMAGE" - < docker/python-base.Dockerfile
docker build -f docker/label-studio.Dockerfile --build-arg "BASE_IMAGE=$PYTHON_IMAGE" \
  ${PIP_INDEX_URL:+--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL"} -t "$LABEL_STUDIO_IMAGE" .
