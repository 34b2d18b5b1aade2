# syntax=docker/dockerfile:1
# cellscan: one image for the prediction service (default command), the Prefect worker, the one-shot
# setup, and, with the same pinned mlflow and prefect, the MLflow and Prefect servers of compose.yaml.
#
#   docker build -t cellscan:0.1.0 .
#   docker run --rm -p 127.0.0.1:3000:3000 -e CELLSCAN_API_KEY=... -e MLFLOW_TRACKING_URI=... cellscan:0.1.0
#   docker run --rm -e PREFECT_API_URL=... cellscan:0.1.0 prefect worker start --pool cellscan
#
# Dependencies come from deploy/requirements.lock: pyproject.toml's pins plus every transitive one,
# with hashes, for CPython 3.11 on x86_64 Linux (regenerate it with the command at its top whenever
# pyproject.toml or deploy/requirements-extra.in changes).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: a virtual environment at /opt/venv (uv; binary wheels, plus pure-Python sdists that need no
#     compiler). Nothing of this stage is kept but the venv.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never UV_NO_CACHE=1
RUN pip install "uv==0.13.9"
WORKDIR /build
COPY deploy/requirements.lock deploy/requirements.lock
RUN uv venv /opt/venv --python /usr/local/bin/python3.11 \
 && VIRTUAL_ENV=/opt/venv uv pip install --require-hashes -r deploy/requirements.lock
COPY pyproject.toml README.md ./
COPY src ./src
RUN VIRTUAL_ENV=/opt/venv uv pip install --no-deps . \
 && /opt/venv/bin/python -c "import cellscan, mlflow, prefect, bentoml, dvc, psycopg2, asyncpg"

# --- final: the venv, the service and flows, git (the runs record the commit), a non-root user
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="cellscan" \
      org.opencontainers.image.description="Visual anomaly detection for CT/X-ray scans of battery cells: service, worker, flows" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && apt-get install -y --no-install-recommends git \
 && rm -rf /var/lib/apt/lists/* \
 && python -m pip uninstall -y -q pip setuptools wheel \
 && groupadd --system --gid 10001 cellscan \
 && useradd --system --uid 10001 --gid cellscan --home-dir /home/cellscan --create-home --shell /usr/sbin/nologin cellscan \
 && mkdir -p /srv/cellscan/data /srv/dvc-remote /srv/prefect-results /srv/images /srv/mlflow-artifacts \
 && chown -R cellscan:cellscan /srv
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/cellscan \
    CELLSCAN_HOME=/srv/cellscan \
    PREFECT_HOME=/home/cellscan/.prefect \
    BENTOML_HOME=/home/cellscan/bentoml \
    PREFECT_RESULTS_LOCAL_STORAGE_PATH=/srv/prefect-results \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1 \
    BENTOML_DO_NOT_TRACK=True \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DVC_NO_ANALYTICS=1 \
    TF_CPP_MIN_LOG_LEVEL=2
WORKDIR /app
# Code and parameters are owned by root: the app user reads them, never changes them.
COPY service ./service
COPY flows ./flows
COPY params.yaml dvc.yaml data.dvc ./
COPY .dvc/config ./.dvc/config
COPY deploy/stack-setup.sh ./deploy/stack-setup.sh
USER cellscan:cellscan
EXPOSE 3000
# The service's readiness (BentoML's /readyz); compose.yaml gives the other roles their own check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=4)"]
CMD ["bentoml", "serve", "service.service:Cellscan", "--host", "0.0.0.0", "--port", "3000"]
