# The two set-up commands of the README, and a few conveniences around them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
N ?= 200

.PHONY: install demo dev test test-fast lint bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

## First command: a fresh clone to the service running with a demo of N payments.
demo: install
	$(BIN)/payment-service dev --demo $(N)

## The service alone, embedded PostgreSQL and broker, until Ctrl-C.
dev: install
	$(BIN)/payment-service dev

## Second command: the whole test suite, exactly as CI runs it.
test: install
	$(BIN)/pytest

## The suite without the long tests (chaos, outages, real-stack scenarios).
test-fast: install
	$(BIN)/pytest -m 'not slow'

lint: install
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/ruff check src tests
	$(BIN)/mypy

## The benchmarks of docs/performance.md (installs the dev extra: the eventsourcing peer, py-spy).
bench: install
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python bench/run_all.py
