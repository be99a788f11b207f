# Two commands matter: `make up` (run Trainyard on this machine) and `make test` (run the test suite).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install up test test-fast services bench bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

up: install
	$(BIN)/trainyard up

services:
	bash scripts/services.sh

test: install services
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

# Benchmarks (bench/): every bench/bench_*.py, then BENCHMARKS.md. `make bench ARGS=--quick` or `make bench-quick`
# for a few minutes' run; ARGS also takes --repeats N, --only 04,07.
bench: install services
	$(BIN)/python bench/run_all.py $(ARGS)

bench-quick: install services
	$(BIN)/python bench/run_all.py --quick $(ARGS)

clean:
	rm -rf .trainyard .pytest_cache
