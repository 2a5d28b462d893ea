#!/usr/bin/env bash
# The Docker image's lock files, made by uv from pyproject.toml (see docs/operations-deploy.md).
#
#   scripts/lock.sh refresh   # re-resolve after a change to pyproject.toml, keeping every
#                             # existing pin that still fits (what `make lock` runs)
#   scripts/lock.sh upgrade   # move every pin to the newest version allowed (`make lock-upgrade`)
#   scripts/lock.sh check     # fail when the locks do not match pyproject.toml (`make lock-check`)
#
# Files (all with sha256 hashes of every wheel/sdist of the pinned version, so they install on
# amd64 and arm64 alike; pip installs them with --require-hashes):
#   requirements/image.txt      runtime dependencies + the [local], [tracing] and [registry]
#                               extras (the default image)
#   requirements/image-api.txt  runtime dependencies + [tracing] and [registry]
#                               (WITH_LOCAL_MODEL=0), pinned to the same versions as image.txt
#                               (resolved with it as constraint)
#   requirements/build.txt      the build backend (pyproject's [build-system] requires), used to
#                               build the project's own wheel without an unpinned download
#
# The [e5], [devstack] and [dev] extras are not in the image and not in these files.
# Needs uv (in the [dev] extra: `make install`) and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-refresh}"
UV="${UV:-}"
if [[ -z "$UV" ]]; then
    if [[ -x .venv/bin/uv ]]; then UV="$PWD/.venv/bin/uv"; else UV=uv; fi
fi
command -v "$UV" >/dev/null || { echo "lock.sh: uv not found (run \`make install\`)" >&2; exit 2; }

# The image's Python (its FROM line) is the Python the locks are resolved for.
PYTHON_VERSION="$(sed -nE 's/^FROM python:([0-9]+\.[0-9]+)[-.@: ].*/\1/p' Dockerfile | sort -u)"
if [[ $(wc -l <<<"$PYTHON_VERSION") -ne 1 || -z "$PYTHON_VERSION" ]]; then
    echo "lock.sh: expected all FROM lines of Dockerfile to use one python:X.Y image" >&2
    exit 2
fi
LOCK_COMMAND="make lock  # scripts/lock.sh, Python ${PYTHON_VERSION}, linux"

compile() {  # compile OUTPUT [uv args...]
    local out="$1"
    shift
    "$UV" pip compile --quiet --generate-hashes \
        --python-version "$PYTHON_VERSION" --python-platform linux \
        --custom-compile-command "$LOCK_COMMAND" \
        --no-emit-index-url \
        "$@" -o "$out"
}

build_requires() {  # the [build-system] requires of pyproject.toml, one per line
    python3 - <<'EOF'
import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["build-system"]["requires"]))
EOF
}

write_locks() {  # write_locks DIR [extra uv args...]
    local dir="$1"
    shift
    mkdir -p "$dir"
    compile "$dir/image.txt" "$@" pyproject.toml --extra local --extra tracing --extra registry
    # Same versions as the default image, minus the [local] extra and what only it needs.
    # (The constraint is passed by its path in the repository so the file's comments are stable.)
    compile "$dir/image-api.txt" "$@" pyproject.toml --extra tracing --extra registry -c "$dir/image.txt"
    sed -i "s|-c $dir/image.txt|-c requirements/image.txt|" "$dir/image-api.txt"
    build_requires >"$dir/.build.in"
    compile "$dir/build.txt" "$@" "$dir/.build.in"
    sed -i "s|$dir/.build.in|pyproject.toml [build-system]|" "$dir/build.txt"
    rm -f "$dir/.build.in"
}

case "$mode" in
    refresh)
        write_locks requirements
        echo "lock.sh: requirements/{image,image-api,build}.txt are up to date with pyproject.toml"
        ;;
    upgrade)
        write_locks requirements --upgrade
        echo "lock.sh: requirements/{image,image-api,build}.txt upgraded; review \`git diff requirements\`"
        ;;
    check)
        tmp="$(mktemp -d)"
        trap 'rm -rf "$tmp"' EXIT
        # Seed the scratch copies with the committed locks: uv keeps existing pins as
        # preferences, so the result differs only when pyproject.toml asks for a change.
        mkdir -p "$tmp/requirements"
        for f in image.txt image-api.txt build.txt; do
            [[ -f "requirements/$f" ]] || { echo "lock.sh: requirements/$f is missing: run \`make lock\`" >&2; exit 1; }
            cp "requirements/$f" "$tmp/requirements/$f"
        done
        write_locks "$tmp/requirements"
        if ! diff -u requirements "$tmp/requirements" >"$tmp/diff"; then
            cat "$tmp/diff" >&2
            echo "lock.sh: requirements/*.txt do not match pyproject.toml / Dockerfile: run \`make lock\`" >&2
            exit 1
        fi
        n="$(grep -cE '^[a-z0-9]' requirements/image.txt)"
        echo "lock.sh: locks match pyproject.toml (image: $n pinned packages, Python $PYTHON_VERSION, hashed)"
        ;;
    *)
        echo "usage: scripts/lock.sh [refresh|upgrade|check]" >&2
        exit 2
        ;;
esac
