# A stand-in for heartexlabs/label-studio where no container registry can be reached: the same Label Studio
# release from PyPI (requirements-label-studio.txt), with the official image's data directory
# (/label-studio/data), user (1001) and port (8080).
# docker/build-without-registry.sh builds it as local/label-studio:1.23.2 (on local/python:3.11-bookworm);
# set LABEL_STUDIO_IMAGE=local/label-studio:1.23.2 in docker/.env to use it. Build context: the repository root.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Where pip finds it (pip reads it from the environment): a mirror for air-gapped builds.
ARG PIP_INDEX_URL=https://pypi.org/simple

# Extra CA certificates (docker/certs/*.crt, e.g. a TLS-intercepting proxy's) are trusted by pip here.
COPY docker/certs/ /tmp/extra-ca/
RUN find /tmp/extra-ca -name '*.crt' -exec cp {} /usr/local/share/ca-certificates/ \; \
    && rm -rf /tmp/extra-ca \
    && update-ca-certificates > /dev/null 2>&1

# Label Studio and every dependency at the versions the tests run (requirements-label-studio.txt).
COPY requirements-label-studio.txt /tmp/
RUN PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements-label-studio.txt \
    && rm /tmp/requirements-label-studio.txt \
    && useradd --uid 1001 --user-group --create-home --home-dir /home/labelstudio --shell /usr/sbin/nologin labelstudio \
    && mkdir -p /label-studio/data \
    && chown -R 1001:1001 /label-studio

ENV LABEL_STUDIO_BASE_DATA_DIR=/label-studio/data \
    PYTHONUNBUFFERED=1
WORKDIR /label-studio
USER 1001:1001
VOLUME ["/label-studio/data"]
EXPOSE 8080

CMD ["label-studio", "start", "--no-browser", "--internal-host", "0.0.0.0", "--port", "8080"]
