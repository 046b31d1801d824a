"""Writes go as EXECUTE of statements each session prepares once (prepared_writes.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
import pytest_asyncio

from payment.adapters.memory import SystemClock
from payment.adapters.postgres.errors import discards_connection, is_transient
from payment.adapters.postgres.pool import Pool, open_pool
from payment.adapters.postgres.prepared_writes import NAME_PREFIX
from payment.adapters.postgres.retention import purge_batch
from payment.adapters.postgres.unit_of_work import PostgresUnitOfWork
from payment.application.errors import ConcurrencyConflict
from support.events import attempted

CLOCK = SystemClock()


@pytest_asyncio.fixture
async def one_connection(pg_pool: Pool, database_url: str) -> AsyncIterator[Pool]:
    """A pool of a single connection, so consecutive units of work share its session."""
    async with open_pool(database_url, min_size=1, max_size=1) as pool:
        yield pool


async def _ours(pool: Pool) -> set[str]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT name FROM pg_prepared_statements WHERE starts_with(name, %s)",
            (NAME_PREFIX,),
            prepare=False,
        )
        return {str(row[0]) for row in await cur.fetchall()}


async def _write_a_stream_and_marks(pool: Pool, message_id: str) -> uuid.UUID:
    stream = uuid.uuid4()
    async with PostgresUnitOfWork(pool) as uow:
        await uow.inbox.mark_new([("saga", message_id)], CLOCK.now())
        await uow.events.append(stream, 0, [attempted(stream, 1)])
        await uow.commit()
    return stream


async def test_a_session_prepares_a_write_once_and_executes_it_after(one_connection: Pool) -> None:
    first = await _write_a_stream_and_marks(one_connection, "m-1")
    prepared = await _ours(one_connection)
    assert len(prepared) == 2  # the inbox mark and the append
    # Sent again as EXECUTE only: a second PREPARE of a name would fail the message.
    second = await _write_a_stream_and_marks(one_connection, "m-2")
    assert await _ours(one_connection) == prepared
    async with PostgresUnitOfWork(one_connection) as uow:
        assert [len(await uow.events.load(s)) for s in (first, second)] == [1, 1]
        assert not await uow.inbox.mark("saga", "m-2", CLOCK.now())


async def test_values_bound_on_the_client_reach_the_prepared_statement_intact(
    one_connection: Pool,
) -> None:
    awkward = "it's 100%s; DROP TABLE payment_inbox; -- ünïcode \\ 🙂"
    await _write_a_stream_and_marks(one_connection, awkward)
    async with PostgresUnitOfWork(one_connection) as uow:
        assert not await uow.inbox.mark("saga", awkward, CLOCK.now())  # found: a duplicate
        assert await uow.inbox.mark("saga", awkward[:-1], CLOCK.now())


async def test_a_message_that_failed_after_its_prepares_leaves_the_session_known(
    pg_pool: Pool, one_connection: Pool
) -> None:
    taken = await _write_a_stream_and_marks(pg_pool, "m-1")  # on another session
    # The first message of this session prepares the append, and fails. No BEGIN nor
    # COMMIT in it: one implicit transaction, whose PREPARE stays when it fails.
    with pytest.raises(ConcurrencyConflict):
        async with PostgresUnitOfWork(one_connection) as uow:
            fresh = uuid.uuid4()
            await uow.events.append(fresh, 0, [attempted(fresh, 1)])
            await uow.events.append(taken, 0, [attempted(taken, 1)])
            await uow.commit()
    # The next message reads what the session holds instead of preparing it again.
    await _write_a_stream_and_marks(one_connection, "m-2")


async def test_a_rollback_that_deallocated_everything_costs_nothing_but_a_prepare(
    one_connection: Pool,
) -> None:
    stream = await _write_a_stream_and_marks(one_connection, "m-1")
    with pytest.raises(LookupError):
        async with PostgresUnitOfWork(one_connection) as uow:
            await uow.events.load(stream)  # psycopg prepares it: its rollback DEALLOCATEs ALL
            await uow.inbox.mark("saga", "m-2", CLOCK.now())
            raise LookupError("the handler failed")
    assert await _ours(one_connection) == set()
    await _write_a_stream_and_marks(one_connection, "m-2")
    assert len(await _ours(one_connection)) == 2


async def test_a_session_that_lost_its_statements_behind_our_back_is_retried_on_a_fresh_one(
    one_connection: Pool,
) -> None:
    await _write_a_stream_and_marks(one_connection, "m-1")
    async with one_connection.connection() as conn:
        await conn.execute("DEALLOCATE ALL", prepare=False)
    with pytest.raises(psycopg.Error) as raised:
        await _write_a_stream_and_marks(one_connection, "m-2")
    assert raised.value.sqlstate == "26000"
    assert is_transient(raised.value) and discards_connection(raised.value)
    await _write_a_stream_and_marks(one_connection, "m-2")  # the retry, on a new session


async def test_a_purge_rolled_back_by_psycopg_leaves_the_session_known(
    one_connection: Pool,
) -> None:
    await _write_a_stream_and_marks(one_connection, "m-1")
    # The purge's transaction block rolls back on its error, and psycopg then deallocates
    # every statement of the session (its own lock probe is prepared).
    with pytest.raises(psycopg.errors.DivisionByZero):
        await purge_batch(one_connection, "SELECT 1 / 0", CLOCK.now(), 10)
    assert await _ours(one_connection) == set()
    await _write_a_stream_and_marks(one_connection, "m-2")


async def test_a_pool_without_prepared_statements_sends_the_writes_as_they_are(
    pg_pool: Pool, database_url: str
) -> None:
    async with open_pool(database_url, min_size=1, max_size=1, prepare_threshold=None) as pool:
        await _write_a_stream_and_marks(pool, "m-1")
        await _write_a_stream_and_marks(pool, "m-2")
        assert await _ours(pool) == set()
