#!/usr/bin/env bash
# The Dockerfile's install steps without Docker (`make image-smoke`): for machines with no
# container engine, like CI here. Needs python3 of the image's version (3.11) and PyPI.
#
# It repeats the builder stage's commands in a scratch directory (keep them in step with the
# Dockerfile), then runs the result the way the runtime stage does: as an unprivileged user,
# from a read-only install, with only /tmp writable. It checks that
#   1. requirements/image.txt (or image-api.txt with WITH_LOCAL_MODEL=0) installs with
#      --require-hashes --only-binary=:all: (complete, hashed, no compiler needed);
#   2. the project's wheel builds with the pinned backend (requirements/build.txt), offline
#      from PyPI, and `pip check` passes;
#   3. `embedding-worker --help` runs and (with the local model) the model embeds text without
#      writing anywhere;
#   4. the HEALTHCHECK command, taken from the Dockerfile, exits 0 against a live /healthz and
#      1 against a 503 or a closed port.
# What it cannot check: the base image itself, COPY/USER/ENTRYPOINT semantics, image size.
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_LOCAL_MODEL="${WITH_LOCAL_MODEL:-1}"
PYTHON_VERSION="$(sed -nE 's/^FROM python:([0-9]+\.[0-9]+)[-.@: ].*/\1/p' Dockerfile | sort -u)"
# The system's Python first: the unprivileged user must be able to run it (a pyenv under
# /root is not readable by uid 10001).
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    for candidate in "/usr/bin/python$PYTHON_VERSION" "/usr/local/bin/python$PYTHON_VERSION" \
        "$(command -v "python$PYTHON_VERSION" || true)"; do
        if [[ -n "$candidate" && -x "$candidate" ]]; then PY="$candidate"; break; fi
    done
fi
[[ -n "$PY" ]] || { echo "image-smoke: needs python$PYTHON_VERSION (the image's Python)" >&2; exit 2; }

work="$(mktemp -d)"
probe_pid=""
cleanup() {
    if [[ -n "$probe_pid" ]]; then kill "$probe_pid" 2>/dev/null || true; fi
    chmod -R u+w "$work" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
# The machine's own pip configuration (mirrors, find-links) must not help: PyPI only.
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL

mkdir -p "$work/src"
cp -r requirements pyproject.toml README.md worker "$work/src/"
find "$work/src/worker" -name __pycache__ -prune -exec rm -rf {} +
cd "$work/src"

echo "== builder stage (WITH_LOCAL_MODEL=$WITH_LOCAL_MODEL, $("$PY" --version))"
if [ "$WITH_LOCAL_MODEL" = "1" ]; then lock=requirements/image.txt; else lock=requirements/image-api.txt; fi
"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --no-cache-dir --require-hashes --only-binary=:all: -r "$lock"
"$PY" -m venv "$work/build"
"$work/build/bin/pip" install --quiet --no-cache-dir --require-hashes --only-binary=:all: \
    -r requirements/build.txt
"$work/build/bin/pip" wheel --quiet --no-cache-dir --no-build-isolation --no-deps \
    --wheel-dir "$work/wheels" .
"$work/venv/bin/pip" install --quiet --no-cache-dir --no-deps "$work"/wheels/embedding_worker-*.whl
"$work/venv/bin/pip" check
"$work/venv/bin/pip" uninstall --yes --quiet pip setuptools
echo "ok   installed from $lock: $(grep -cE '^[a-z0-9]' "$lock") pinned packages + $(basename "$work"/wheels/*.whl)"

echo "== runtime stage (read-only install, unprivileged user, only a scratch /tmp writable)"
mkdir -p "$work/app" "$work/tmp"
cp -r "$OLDPWD/migrations" "$work/app/"
chmod -R a+rX,a-w "$work/venv" "$work/app"
chmod 1777 "$work/tmp"
chmod a+rx "$work"
as_app() {  # run like the image: uid 10001 when root, PATH/HOME as in the Dockerfile
    local env=(env -i PATH="$work/venv/bin:/usr/bin:/bin" HOME="$work/tmp" TMPDIR="$work/tmp"
        PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 "$@")
    if [[ $EUID -eq 0 ]]; then
        (cd "$work/app" && exec setpriv --reuid=10001 --regid=10001 --clear-groups "${env[@]}")
    else
        (cd "$work/app" && exec "${env[@]}")
    fi
}
as_app embedding-worker --help >/dev/null
echo "ok   embedding-worker --help"
if [ "$WITH_LOCAL_MODEL" = "1" ]; then
    as_app python -c '
import asyncio
from worker.config import Settings
from worker.embedding.providers.local import LocalEmbedder
from worker.events import TextType
async def main():
    e = LocalEmbedder(Settings().provider)
    out = await e.embed(["rocket launch to the moon", "el cohete despegó"], TextType.DOCUMENT)
    await e.aclose()
    print(f"ok   local model {e.model} ({e.dimension}-d) embeds from the read-only install")
asyncio.run(main())'
fi

echo "== HEALTHCHECK (the command in the Dockerfile)"
hc="$(sed -nE 's/^ *CMD \["python", "-c", "(.*)"\]$/\1/p' "$OLDPWD/Dockerfile")"
[[ -n "$hc" ]] || { echo "image-smoke: no HEALTHCHECK CMD found in the Dockerfile" >&2; exit 1; }
port=18099
as_app python -c '
import asyncio, os, sys
from prometheus_client import CollectorRegistry
from worker.ops.probes import ProbeServer
async def main():
    server = ProbeServer(CollectorRegistry(), lambda: {"postgres": False})
    await server.start("127.0.0.1", int(sys.argv[1]))
    with open(sys.argv[2], "w") as f:
        f.write(str(os.getpid()))
    await asyncio.sleep(60)
asyncio.run(main())' $port "$work/tmp/probe.pid" >/dev/null 2>&1 &
for _ in $(seq 100); do
    [[ -s "$work/tmp/probe.pid" ]] && break
    sleep 0.1
done
probe_pid="$(cat "$work/tmp/probe.pid")"
as_app EMBEDDING_WORKER_HTTP__PORT=$port python -c "$hc"
echo "ok   exits 0 while /healthz answers 200"
if as_app EMBEDDING_WORKER_HTTP__PORT=$port python -c "${hc/healthz/readyz}" 2>/dev/null; then
    echo "FAIL: the same request exits 0 on a 503 (/readyz, not ready)" >&2
    exit 1
fi
echo "ok   exits non-zero on a 503 (same command against /readyz, which is not ready)"
kill "$probe_pid"
while kill -0 "$probe_pid" 2>/dev/null; do sleep 0.1; done
probe_pid=""
if as_app EMBEDDING_WORKER_HTTP__PORT=$port python -c "$hc" 2>/dev/null; then
    echo "FAIL: exits 0 with nothing listening" >&2
    exit 1
fi
echo "ok   exits non-zero with nothing listening"
echo
echo "image-smoke: the Dockerfile's install and HEALTHCHECK work (without Docker)"
