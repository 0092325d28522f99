# The two commands a user needs: `make demo` and `make test`.
# Both create or reuse .venv and install the pinned requirements into it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint infra-check infra-validate unit demo up down status bench clean

setup: $(STAMP)

# pyproject.toml too: it names the `dicomflow` command's module, which the editable install writes.
$(STAMP): requirements.txt requirements-ops.txt requirements-dev.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "dicomflow needs Python 3.11 or newer; set PYTHON=/path/to/python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The provider mirrors for terraform validate are built (downloads included) before pytest, so
# the suite's time is the tests' own.
# The suite runs in PYTEST_WORKERS processes (pytest-xdist); tests/conftest.py sends each
# module, and the modules sharing an expensive fixture together, to one process, so each fixture
# is built once. PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2

test: lint infra-check
	$(PY) -m tests.tfvalidate.run --prepare
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

# The unit tests alone (tests/unit): no emulators.
unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# checkov has its own venv: its dependencies clash with the pins above. It runs offline
# (no API key, no policy download, no update check).
CHECKOV_VERSION := 3.3.30
CHECKOV_VENV := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)

$(CHECKOV_STAMP):
	@test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --disable-pip-version-check checkov==$(CHECKOV_VERSION)
	@touch $@

infra-check: $(CHECKOV_STAMP)
	@if command -v terraform >/dev/null 2>&1; then terraform fmt -check -recursive infra; \
	  else echo "terraform not installed: skipping terraform fmt -check"; fi
	env -u BC_API_KEY BC_SKIP_MAPPING=TRUE CKV_SKIP_PACKAGE_UPDATE_CHECK=true \
	  $(CHECKOV_VENV)/bin/checkov --directory infra --framework terraform --skip-download --compact --quiet

# terraform init && terraform validate for google 6.x and 7.x, offline (also run by `make test`
# through tests/unit/test_tfvalidate.py). Its virtualenv, wheels and schemas are cached in
# .cache/tfvalidate/, pinned by requirements-tfvalidate.txt.
infra-validate: $(STAMP)
	$(PY) -m tests.tfvalidate.run infra

demo: $(STAMP)
	$(PY) -m localcloud demo

up: $(STAMP)
	$(PY) -m localcloud up --detach
	@$(PY) -m localcloud env

down: $(STAMP)
	$(PY) -m localcloud down

status: $(STAMP)
	$(PY) -m localcloud status

# Sizes that finish in under 10 minutes on 2 cores (the burst's per-file import is bound
# by the quota, about 1 file/s). Full sizes, by hand:
# `bench/ingest_burst.py` (5,000 instances) and `bench/chaos.py` (M = 5,000).
bench: $(STAMP)
	$(PY) bench/emulator_import.py
	$(PY) bench/export.py
	$(PY) bench/sweep.py --objects $(BENCH_SWEEP)
	$(PY) bench/ingest_burst.py --instances $(BENCH_BURST) --timeout 300 --idle 10 --steady-seconds 20
	$(PY) bench/chaos.py --files $(BENCH_CHAOS)

BENCH_BURST ?= 100
BENCH_CHAOS ?= 200
BENCH_SWEEP ?= 2000

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .cache/tfvalidate .localcloud .pytest_cache .mypy_cache .ruff_cache
