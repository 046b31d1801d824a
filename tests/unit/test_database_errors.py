"""Database errors are judged by SQLSTATE class: an outage is waited out, a bug is not."""

from __future__ import annotations

import psycopg
import psycopg_pool
import pytest
from psycopg import errors

from payment.adapters.postgres.errors import discards_connection, is_transient


@pytest.mark.parametrize(
    "state",
    [
        "25006",  # read-only transaction: a failover, a database switched read-only
        "53300",  # too many connections
        "53100",  # disk full
        "53200",  # out of memory
        "57P01",  # admin shutdown
        "57P02",  # crash shutdown
        "57P03",  # cannot connect now (starting up, in recovery)
        "08006",  # connection failure
        "08001",  # cannot establish a connection
        "40001",  # serialization failure
        "40P01",  # deadlock
    ],
)
def test_an_outage_state_is_transient(state: str) -> None:
    assert is_transient(errors.lookup(state)("server says no"))


@pytest.mark.parametrize(
    "state",
    [
        "23505",  # unique violation: a lost race the adapters translate, or a bug
        "22P02",  # invalid text representation
        "42P01",  # undefined table: the schema is not migrated
        "42601",  # syntax error
        "XX000",  # internal error
    ],
)
def test_a_state_that_is_no_outage_is_not_transient(state: str) -> None:
    assert not is_transient(errors.lookup(state)("server says no"))


def test_a_read_only_transaction_is_transient_although_psycopg_calls_it_internal() -> None:
    exc = errors.ReadOnlySqlTransaction("cannot execute INSERT in a read-only transaction")
    assert isinstance(exc, psycopg.InternalError)
    assert is_transient(exc)
    assert discards_connection(exc)


def test_a_lost_connection_without_a_state_is_transient() -> None:
    assert is_transient(psycopg.OperationalError("server closed the connection unexpectedly"))
    assert is_transient(psycopg_pool.PoolTimeout("couldn't get a connection after 30 sec"))
    assert not is_transient(psycopg.ProgrammingError("the query has 2 placeholders"))
    assert not is_transient(ValueError("not a database error"))


@pytest.mark.parametrize("state", ["26000", "42P05"])
def test_a_session_whose_prepared_statements_are_unknown_is_retried_on_a_fresh_one(
    state: str,
) -> None:
    exc = errors.lookup(state)("prepared statement does not exist (or already does)")
    assert is_transient(exc)
    assert discards_connection(exc)


def test_only_a_suspect_session_is_discarded() -> None:
    assert discards_connection(errors.AdminShutdown("terminating connection"))
    assert not discards_connection(errors.SerializationFailure("could not serialize"))
    assert not discards_connection(errors.UniqueViolation("duplicate key"))
