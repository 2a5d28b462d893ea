# `make demo` and `make test` work on a fresh machine: they create .venv and install
# what they need the first time (or when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit test-kafka lint format install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[local,e5,devstack,dev,bench,tracing,registry]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/embedding-worker demo

# Two pytest processes (pytest-xdist), each starting its own broker and Postgres, a test file
# kept in one process: 9 min instead of 18 on 2 shared cores. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# tests/unit only: no broker, Postgres, fake embedding API or worker process (about 20 s).
test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

# The tests that use a broker, on Apache Kafka (one KRaft node, and a 3-node cluster for the
# failover tests): needs Java 17+ and Maven; the first run resolves the jars from Maven Central.
test-kafka: $(STAMP)
	EMBEDDING_WORKER_DEVSTACK_BROKER=kafka $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy worker fakeapi tests benchmarks evaluation scripts helm
	$(BIN)/hadolint Dockerfile
	$(BIN)/shellcheck scripts/*.sh helm/check.sh
	$(MAKE) --no-print-directory lock-check chart-check

# The Docker image's lock files, requirements/*.txt (see docs/operations-deploy.md).
.PHONY: lock lock-upgrade lock-check chart-check image-smoke
lock: $(STAMP)          ## re-resolve after editing pyproject.toml; keeps every pin that still fits
	UV=$(BIN)/uv bash scripts/lock.sh refresh

lock-upgrade: $(STAMP)  ## move every pin to the newest allowed version
	UV=$(BIN)/uv bash scripts/lock.sh upgrade

lock-check: $(STAMP)    ## fail when the locks do not match pyproject.toml
	UV=$(BIN)/uv bash scripts/lock.sh check

# The Helm chart: helm lint/template (Helm 3 and 4), schemas, rendered-manifest validation.
chart-check: $(STAMP)
	VENV=$(VENV) bash helm/check.sh

# The Dockerfile's install steps and HEALTHCHECK, without Docker (~30 s, downloads the wheels).
image-smoke:
	bash scripts/image-smoke.sh

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

# Benchmarks (benchmarks/, results in docs/benchmarks/), on one Apache Kafka node (Java 17+,
# Maven; scenario 9 also starts the 3-node cluster): the run of record, and a smoke for CI at
# tiny sizes. `--broker tansu` (or EMBEDDING_WORKER_DEVSTACK_BROKER) runs them on Tansu.
.PHONY: bench bench-smoke
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --broker kafka --runs 3

bench-smoke: $(STAMP)
	$(BIN)/python -m benchmarks.run --smoke --no-profile --broker kafka
