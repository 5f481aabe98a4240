# Two entry points for a fresh machine: `make serve` and `make test`.
# Both bootstrap ./.venv (Python >= 3.11) with everything the project needs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml setup.py $(wildcard proto/broker/v1/*.proto) $(wildcard broker_ext/*.pyx broker_ext/*.pxd)

.PHONY: serve test lint typecheck unit bench clean

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "Cython>=3.0,<4" "grpcio-tools>=1.85,<2"
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

## Run the broker on its embedded default: LMDB in ./broker-data, 127.0.0.1:50051, no auth;
## Prometheus metrics on http://127.0.0.1:9464/metrics.
serve: $(STAMP)
	$(VENV)/bin/broker serve --insecure-dev --metrics 127.0.0.1:9464

lint: $(STAMP)
	$(VENV)/bin/ruff check broker broker_ext loadtests tests setup.py
	$(VENV)/bin/ruff format --check broker broker_ext loadtests tests setup.py
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH cython-lint broker_ext

typecheck: $(STAMP)
	$(VENV)/bin/mypy

## The whole suite: lint, types, then the tests with the compiled twins and again pure-Python.
test: lint typecheck
	$(PY) -m pytest -q
	BROKER_NO_EXTENSIONS=1 $(PY) -m pytest -q -m "not slow"

## The benchmark report (~5 min on 2 cores): bench-out/report.md, bench.json, latency.png,
## throughput.png. `make bench BENCH_ARGS=--quick` for a ~1 min smoke run.
bench: $(STAMP)
	$(PY) -m loadtests.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info broker/v1 broker_ext/*.c broker_ext/*.so
