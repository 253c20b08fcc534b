# pbrf-audit: `make run` serves on the embedded default; `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the build that lies on the dev machines' disk; a looser spec fetches several GB.
TORCH := torch==2.14.1 torchvision==0.29.1
HOST ?= 127.0.0.1
WORKERS ?= 1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: run test test-fast install install-test services browser bench clean

$(VENV)/.torch:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

## Serve the API and WORKERS worker processes (default 1) on the embedded default (SQLite, local
## artifacts, filesystem broker); several share a large audit's shards: `make run WORKERS=2`.
run: $(VENV)/.installed
	PBRF_WORKER_CONCURRENCY=$(WORKERS) $(PY) -m app.cli serve --host $(HOST) --port $(PORT)

## Make sure PostgreSQL and Redis run on 127.0.0.1 (starting them if not).
services:
	bash scripts/ensure-services.sh

## Debian's chromium for the review page's browser test (apt-get when missing and root; else the test skips).
browser:
	bash scripts/ensure-chromium.sh

## The whole test suite against real PostgreSQL, Redis, Celery worker processes and HTTP.
test: $(VENV)/.installed-test services browser
	$(PY) -m pytest $(PYTEST_ARGS)

## The fast in-process layer: engine units, loaders, the app under a test client on SQLite (schemathesis
## included); starts no service process and needs no PostgreSQL or Redis. About 85 s on 2 cores.
## One torch thread: these small models gain nothing from two, and on a busy machine two threads
## that wait on each other made the same tests several times slower.
FAST_TESTS := tests/test_engine_exact.py tests/test_engine_loo.py tests/test_engine_scalable.py \
	tests/test_engine_shards.py tests/test_loaders.py tests/test_architectures.py tests/test_service_units.py \
	tests/test_deploy_files.py tests/test_api_contract.py tests/test_schemathesis.py tests/test_ui.py \
	tests/test_client_units.py
test-fast: $(VENV)/.installed-test
	OMP_NUM_THREADS=1 $(PY) -m pytest $(FAST_TESTS) $(PYTEST_ARGS)

## Benchmarks (slow; results land in bench/results/).
bench: $(VENV)/.installed-test
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/quality.py

clean:
	rm -rf var .pytest_cache
