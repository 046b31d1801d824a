"""Fixtures shared by every test suite: fresh databases and unit-of-work factories."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from payment.adapters.memory import MemoryUnitOfWorkFactory
from payment.adapters.postgres.migrations import migrate
from payment.adapters.postgres.pool import Pool, open_pool
from payment.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from support.fixtures import (
    DatabaseFactory,
    database_url,
    kafka_bootstrap,
    make_database,
    postgres_server_url,
)

__all__ = [
    "DatabaseFactory",
    "database_url",
    "kafka_bootstrap",
    "make_database",
    "memory_uow_factory",
    "pg_pool",
    "pg_uow_factory",
    "postgres_server_url",
]


@pytest_asyncio.fixture
async def pg_pool(database_url: str) -> AsyncIterator[Pool]:
    """An open pool on this test's own freshly migrated database."""
    await migrate(database_url)
    async with open_pool(database_url, min_size=2, max_size=10) as pool:
        yield pool


@pytest.fixture
def memory_uow_factory() -> MemoryUnitOfWorkFactory:
    """Units of work over a fresh in-memory database."""
    return MemoryUnitOfWorkFactory()


@pytest.fixture
def pg_uow_factory(pg_pool: Pool) -> PostgresUnitOfWorkFactory:
    """Units of work over this test's own PostgreSQL database."""
    return PostgresUnitOfWorkFactory(pg_pool)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--stack",
        choices=("memory", "real", "both"),
        default="both",
        help=(
            "where the Gherkin scenarios (tests/features) run: on the in-memory adapters, "
            "through the real stack (PostgreSQL, the broker, `payment-service run`; with the "
            "fake and the sandbox processor), or both (default; the real-stack runs are "
            "marked slow, so -m 'not slow' keeps only the in-memory one)"
        ),
    )


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Name the broker the suites run against (Apache Kafka unless told otherwise)."""
    from support.broker import describe

    return [describe()]
