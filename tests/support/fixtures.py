"""Pytest fixtures over the broker and database helpers, for conftest files to import."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import pytest

from . import broker, database


class DatabaseFactory(Protocol):
    """Creates one more fresh database per call; all are dropped after the test."""

    def __call__(self, prefix: str = "payment_test") -> str: ...


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap servers of the session's Kafka-compatible broker."""
    with broker.kafka_bootstrap_servers() as servers:
        yield servers


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """URL of the session's PostgreSQL server, as a role that may create databases."""
    with database.postgres_server() as url:
        yield url


@pytest.fixture
def make_database(postgres_server_url: str) -> Iterator[DatabaseFactory]:
    """Factory of fresh, uniquely named databases, dropped when the test ends."""
    with contextlib.ExitStack() as created:

        def make(prefix: str = "payment_test") -> str:
            return created.enter_context(
                database.fresh_database(postgres_server_url, prefix=prefix)
            )

        yield make


@pytest.fixture
def database_url(make_database: DatabaseFactory) -> str:
    """URL of a fresh, empty database of its own for this test."""
    return make_database()
