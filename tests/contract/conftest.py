"""Runs every contract test once per adapter: the same test body, in memory and on PostgreSQL."""

from __future__ import annotations

import pytest

from payment.application.ports import UnitOfWorkFactory

_FIXTURES = {"memory": "memory_uow_factory", "postgres": "pg_uow_factory"}


@pytest.fixture(params=sorted(_FIXTURES))
def uow_factory(request: pytest.FixtureRequest) -> UnitOfWorkFactory:
    """A unit-of-work factory over an empty store of the adapter under test."""
    factory: UnitOfWorkFactory = request.getfixturevalue(_FIXTURES[request.param])
    return factory
