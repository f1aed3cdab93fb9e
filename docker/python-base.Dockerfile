# A stand-in for python:3.11-slim where no container registry can be reached: Debian bookworm's python3 (3.11)
# in a virtualenv on PATH (python, pip), on a Debian image made locally with debootstrap.
# docker/build-without-registry.sh builds it as local/python:3.11-bookworm; docker/Dockerfile and
# docker/label-studio.Dockerfile then take it as BASE_IMAGE.
ARG DEBIAN_IMAGE=local/debian:bookworm
FROM ${DEBIAN_IMAGE}

ENV LANG=C.UTF-8 \
    PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/python \
    && python --version && pip --version

CMD ["python3"]
