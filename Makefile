# The two set-up commands of the README, and a few conveniences around them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
N ?= 200

.PHONY: install lock demo dev test test-fast test-sasl test-tansu coverage-layers mutation lint asyncapi-check bench

## The pinned versions of requirements.lock (every extra: the test extra brings otlp, whose
## exporter test sends to an in-process receiver), then the project itself.
$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

install: $(BIN)/.installed

## Resolve requirements.lock again from pyproject.toml's bounds (after changing them).
lock: install
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
		--custom-compile-command 'make lock' --quiet -o requirements.lock

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

## The checks the project declares (CI runs them before the tests): ruff, mypy --strict
## (pyproject.toml), the import-linter contracts and docs/asyncapi.yaml against AsyncAPI 3.0.
lint: install
	$(BIN)/ruff check src tests bench tools
	$(BIN)/ruff format --check src tests bench tools
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(MAKE) asyncapi-check

## docs/asyncapi.yaml against the vendored AsyncAPI 3.0.0 JSON schema (tools/asyncapi/).
asyncapi-check: install
	$(BIN)/python tools/asyncapi/validate.py docs/asyncapi.yaml

## The benchmarks of docs/performance.md, ending in issue 15's table on Apache Kafka (each
## target, its figure, met or what bounds it); installs the dev extra (the eventsourcing peer).
bench: install
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python bench/run_all.py
