# Stand-ins for Flower's official images (flwr/superlink, flwr/supernode, flwr/superexec), for
# hosts that cannot pull from Docker Hub. Same layout as the official ones where this project
# relies on it: flwr in a venv on PATH (/python/venv), a non-root user `app` (UID 49999) with
# HOME=/app, and the component as ENTRYPOINT. Build one target per component from any image
# with Python >= 3.10 and its venv module:
#
#   docker build -f docker/flwr.Dockerfile --target superlink -t local/flwr-superlink:1.41.0 \
#       --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm docker/
#
# (likewise --target supernode and --target superexec), then point the compose files at them
# with SUPERLINK_IMAGE, SUPERNODE_IMAGE and SUPEREXEC_IMAGE.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE} AS flwr
ARG FLWR_VERSION=1.41.0
# As in ./Dockerfile: a CA bundle fetched during the install step only, for TLS-inspecting proxies.
ARG EXTRA_CA_URL=
USER root
RUN useradd --no-create-home --home-dir /app --uid 49999 --user-group app \
    && mkdir -p /app /python \
    && chown app:app /app /python
# Settings before the install, so no later step copies the large layer again (vfs storage).
ENV PATH=/python/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LANG=C.UTF-8 \
    HOME=/app
WORKDIR /app
USER app
RUN set -eu; \
    python3 -m venv /python/venv; \
    if [ -n "${EXTRA_CA_URL}" ]; then \
        python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
            "${EXTRA_CA_URL}" /tmp/extra-ca.crt; \
        export PIP_CERT=/tmp/extra-ca.crt; \
    fi; \
    python -m pip install --no-cache-dir --disable-pip-version-check "flwr==${FLWR_VERSION}"; \
    rm -f /tmp/extra-ca.crt

FROM flwr AS superlink
ENTRYPOINT ["flower-superlink"]

FROM flwr AS supernode
ENTRYPOINT ["flower-supernode"]

FROM flwr AS superexec
ENTRYPOINT ["flower-superexec"]
