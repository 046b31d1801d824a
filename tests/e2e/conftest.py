"""Fixtures of the end-to-end suites: log directory, module databases, service stacks."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from support import broker
from support.database import fresh_database, postgres_server
from support.secure_kafka import secure_kafka
from support.tls_postgres import tls_postgres

from .harness import ServiceProcess, ServiceStack, StackFactory, open_stack, use_kafka_security

# `1`: the e2e suites' databases live on a private PostgreSQL that accepts TLS only, reached
# with sslmode=verify-full (issue 18; `make test-sasl` sets it with the SASL_SSL broker).
POSTGRES_TLS_ENV_VAR = "PAYMENT_TEST_POSTGRES_TLS"

# `sasl_ssl`: the e2e suites run against a SASL_SSL (SCRAM-SHA-512) listener of a broker
# started here; services and the harness's clients connect through it (issue 18).
SECURITY_ENV_VAR = "PAYMENT_TEST_KAFKA_SECURITY"


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's broker; its SASL_SSL listener when $PAYMENT_TEST_KAFKA_SECURITY=sasl_ssl."""
    wanted = os.environ.get(SECURITY_ENV_VAR, "").strip().lower()
    if wanted in ("", "plaintext"):
        with broker.kafka_bootstrap_servers() as servers:
            yield servers
        return
    if wanted != "sasl_ssl":
        raise RuntimeError(f"{SECURITY_ENV_VAR}={wanted!r}: expected plaintext or sasl_ssl")
    with secure_kafka(tmp_path_factory.mktemp("secure-kafka")) as kafka:
        env = kafka.service_env()
        del env["PAYMENT_KAFKA_BOOTSTRAP_SERVERS"]
        use_kafka_security(env)
        try:
            yield kafka.bootstrap
        finally:
            use_kafka_security({})


@pytest.fixture(scope="session")
def postgres_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The session's PostgreSQL; a TLS-only one when $PAYMENT_TEST_POSTGRES_TLS=1."""
    if os.environ.get(POSTGRES_TLS_ENV_VAR, "").strip() not in ("1", "true", "yes"):
        with postgres_server() as url:
            yield url
        return
    with tls_postgres(tmp_path_factory.mktemp("tls-postgres")) as server:
        # The superuser over verified TLS; each test database's URL keeps the query.
        yield (
            f"postgresql://postgres@localhost:{server.port}/postgres"
            f"?sslmode=verify-full&sslrootcert={server.certificates.ca}"
        )


@pytest.fixture(scope="session")
def e2e_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where every service process of the run writes its log (kept by pytest's basetemp)."""
    return tmp_path_factory.mktemp("e2e-logs")


@pytest.fixture(scope="module")
def module_database_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, empty database shared by one test module (and its one service)."""
    with fresh_database(postgres_server_url, prefix="payment_e2e") as url:
        yield url


# The stacks a test made through `make_stack`, for its report if it fails.
_MADE_STACKS = pytest.StashKey[list[ServiceStack]]()


@pytest_asyncio.fixture
async def make_stack(
    request: pytest.FixtureRequest,
    kafka_bootstrap: str,
    make_database: Callable[..., str],
    e2e_log_dir: Path,
) -> AsyncIterator[StackFactory]:
    """Factory of test-owned stacks (`await make_stack(PAYMENT_FAKE_MODE="fail")`), each on
    its own fresh database and topics, torn down after the test."""
    made = request.node.stash.setdefault(_MADE_STACKS, [])
    async with AsyncExitStack() as stacks:

        async def make(*, instances: int = 1, **overrides: str) -> ServiceStack:
            stack = await stacks.enter_async_context(
                open_stack(
                    bootstrap=kafka_bootstrap,
                    database_url=make_database(prefix="payment_e2e"),
                    log_dir=e2e_log_dir,
                    instances=instances,
                    **overrides,
                )
            )
            made.append(stack)
            return stack

        yield make


def _services_of(item: pytest.Item) -> list[ServiceProcess]:
    found: list[ServiceProcess] = []
    for stack in item.stash.get(_MADE_STACKS, []):
        found += stack.services
    for value in getattr(item, "funcargs", {}).values():
        candidates: list[Any] = [value]
        if isinstance(value, ServiceStack):
            candidates = list(value.services)
        found += [c for c in candidates if isinstance(c, ServiceProcess)]
    return found


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failing test's report carries the tail of each service log it used."""
    report = yield
    if report.failed:
        for service in _services_of(item):
            report.sections.append((f"service log: {service.name}", service.log_tail(80)))
    return report
