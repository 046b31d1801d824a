# The two set-up commands of the README, and a few conveniences around them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
N ?= 200

.PHONY: install demo dev test test-fast test-sasl test-tansu coverage-layers mutation lint bench

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

## Second command: the whole test suite, exactly as CI runs it: every suite on Apache
## Kafka (started by the tests; java and mvn needed) under branch coverage, the services
## the e2e tests start included; the e2e contract suite again through Kafka's SASL_SSL
## listener, then the Tansu compatibility job (the e2e contract suite on the broker of
## `payment-service dev`, whose demo test runs in the first pass: `dev` uses Tansu unless
## told otherwise); last, coverage per layer, failing under the floors.
## CI=true makes the chaos test refuse a CHAOS_KILLS below its floor.
test: install
	rm -f .coverage .coverage.* coverage.json
	COVERAGE_FILE=$(CURDIR)/.coverage $(BIN)/pytest --cov --cov-report=
	$(MAKE) test-sasl
	$(MAKE) test-tansu
	$(MAKE) coverage-layers

## Coverage per layer of the last `make test` (or any run that left .coverage* here).
coverage-layers:
	-$(BIN)/coverage combine -q
	$(BIN)/coverage json -q -o coverage.json
	$(BIN)/python tools/ci/coverage_layers.py coverage.json

## The e2e contract suite through a SASL_SSL (SCRAM-SHA-512) listener of Apache Kafka
## and a PostgreSQL that accepts TLS only (sslmode=verify-full).
test-sasl: install
	PAYMENT_TEST_KAFKA_SECURITY=sasl_ssl PAYMENT_TEST_POSTGRES_TLS=1 $(BIN)/pytest tests/e2e/test_run_e2e.py

test-tansu: install
	PAYMENT_TEST_BROKER=tansu $(BIN)/pytest tests/e2e/test_run_e2e.py

## The suite without the long tests (chaos, outages, real-stack scenarios).
test-fast: install
	$(BIN)/pytest -m 'not slow'

## Mutation testing of the domain and application layers with mutmut (slow: run locally,
## not in CI).
mutation: install
	$(BIN)/pip install --quiet 'mutmut>=3,<4'
	$(BIN)/mutmut run
	$(BIN)/mutmut results

## The checks the project declares (CI runs them before the tests).
lint: install
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

## The benchmarks of docs/performance.md (installs the dev extra: the eventsourcing peer, py-spy).
bench: install
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python bench/run_all.py
