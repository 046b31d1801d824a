"""How PostgresUnitOfWork uses its pooled connection: lazy transaction, clean hand-back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, nullcontext

import psycopg
import pytest
import pytest_asyncio
from psycopg.pq import TransactionStatus

from payment.adapters.memory import SystemClock
from payment.adapters.postgres.pool import Pool, open_pool
from payment.adapters.postgres.unit_of_work import PostgresUnitOfWork, PostgresUnitOfWorkFactory
from payment.application.errors import ConcurrencyConflict
from support.events import attempted

CLOCK = SystemClock()


@pytest_asyncio.fixture
async def one_connection(pg_pool: Pool, database_url: str) -> AsyncIterator[Pool]:
    """A pool of a single connection, so consecutive units of work share it."""
    async with open_pool(database_url, min_size=1, max_size=1) as pool:
        yield pool


def _in_transaction(uow: PostgresUnitOfWork) -> bool:
    conn = uow.events._tx._conn
    assert conn is not None
    return conn.info.transaction_status is not TransactionStatus.IDLE


async def _prepared_statements(uow: PostgresUnitOfWork) -> int:
    cur = await uow.events._tx.read("SELECT count(*) FROM pg_prepared_statements")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def _stream_of_one_event(pool: Pool) -> uuid.UUID:
    """A new stream with its first event committed."""
    stream = uuid.uuid4()
    async with PostgresUnitOfWork(pool) as uow:
        await uow.events.append(stream, 0, [attempted(stream, 1)])
        await uow.commit()
    return stream


async def test_reads_run_outside_a_transaction_until_the_first_write(
    one_connection: Pool,
) -> None:
    stream = uuid.uuid4()
    async with PostgresUnitOfWork(one_connection) as uow:
        await uow.events.load(stream)
        assert not _in_transaction(uow)
        await uow.inbox.mark("saga", "m-1", CLOCK.now())
        assert _in_transaction(uow)
        await uow.events.append(stream, 0, [attempted(stream, 1)])
        assert len(await uow.events.load(stream)) == 1
        await uow.commit()
        assert not _in_transaction(uow)


async def test_writes_without_a_result_wait_for_the_next_statement_or_the_commit(
    one_connection: Pool,
) -> None:
    stream = uuid.uuid4()
    async with PostgresUnitOfWork(one_connection) as uow:
        await uow.events.append(stream, 0, [attempted(stream, 1)])
        # Nothing sent yet: no transaction, and a reader elsewhere sees nothing.
        assert not _in_transaction(uow)
        await uow.events.append(stream, 1, [attempted(stream, 2)])
        # A read in the unit of work sees its own writes (they are sent first).
        assert len(await uow.events.load(stream)) == 2
        assert _in_transaction(uow)
        await uow.outbox.add([])
        await uow.commit()
    async with PostgresUnitOfWork(one_connection) as uow:
        assert len(await uow.events.load(stream)) == 2


async def test_a_deferred_conflict_surfaces_at_commit_and_nothing_commits(
    one_connection: Pool,
) -> None:
    stream = await _stream_of_one_event(one_connection)
    with pytest.raises(ConcurrencyConflict):
        async with PostgresUnitOfWork(one_connection) as uow:
            assert await uow.inbox.mark("saga", "m-2", CLOCK.now())
            await uow.events.append(stream, 0, [attempted(stream, 1)])  # behind: version 1 exists
            await uow.commit()
    async with PostgresUnitOfWork(one_connection) as uow:
        assert len(await uow.events.load(stream)) == 1
        assert await uow.inbox.mark("saga", "m-2", CLOCK.now())  # the mark was rolled back


async def test_deferred_writes_alone_commit_in_one_message_all_or_nothing(
    one_connection: Pool,
) -> None:
    taken, fresh = await _stream_of_one_event(one_connection), uuid.uuid4()
    # No statement before the commit: the writes go in one message without BEGIN, which
    # PostgreSQL runs as one implicit transaction. The second collides on (stream, version).
    with pytest.raises(ConcurrencyConflict):
        async with PostgresUnitOfWork(one_connection) as uow:
            await uow.events.append(fresh, 0, [attempted(fresh, 1)])
            await uow.events.append(taken, 0, [attempted(taken, 1)])
            assert not _in_transaction(uow)
            await uow.commit()
    async with PostgresUnitOfWork(one_connection) as uow:
        assert await uow.events.load(fresh) == []
        assert len(await uow.events.load(taken)) == 1


async def test_a_value_that_cannot_be_bound_sends_nothing_and_keeps_the_deferred_writes(
    one_connection: Pool,
) -> None:
    stream = uuid.uuid4()
    async with PostgresUnitOfWork(one_connection) as uow:
        await uow.events.append(stream, 0, [attempted(stream, 1)])
        with pytest.raises(psycopg.DataError):
            await uow.inbox.mark("saga", "nul\x00in the id", CLOCK.now())
        assert not _in_transaction(uow)  # nothing was sent
        await uow.commit()  # the append was still queued, and commits
    async with PostgresUnitOfWork(one_connection) as uow:
        assert len(await uow.events.load(stream)) == 1


async def test_fewer_results_than_statements_is_an_error_not_a_misplaced_check(
    one_connection: Pool,
) -> None:
    async with PostgresUnitOfWork(one_connection) as uow:
        tx = uow.events._tx
        tx.defer("-- a comment swallows the separator that follows it")
        with pytest.raises(RuntimeError, match="fewer results"):
            await tx.read("SELECT 1")


@pytest.mark.parametrize("ending", ["commit", "leave", "error", "conflict"])
async def test_the_connection_goes_back_idle_in_autocommit(
    one_connection: Pool, ending: str
) -> None:
    stream = uuid.uuid4()
    async with PostgresUnitOfWork(one_connection) as uow:
        await uow.events.append(stream, 0, [attempted(stream, 1)])
        await uow.commit()
    async with PostgresUnitOfWork(one_connection) as uow:
        await uow.events.load(stream)
        prepared_before = await _prepared_statements(uow)
    assert prepared_before >= 2

    fails = ending in ("error", "conflict")
    expected: AbstractContextManager[object] = (
        pytest.raises((LookupError, ConcurrencyConflict)) if fails else nullcontext()
    )
    with expected:
        async with PostgresUnitOfWork(one_connection) as uow:
            events = await uow.events.load(stream)
            if ending == "conflict":
                await uow.events.append(stream, 0, [attempted(stream, 1)])
            await uow.events.append(stream, len(events), [attempted(stream, len(events) + 1)])
            if ending in ("commit", "conflict"):
                await uow.commit()  # a conflict of a queued append surfaces here
            elif ending == "error":
                raise LookupError("handler failed")

    async with one_connection.connection() as conn:
        assert conn.autocommit
        assert conn.info.transaction_status.name == "IDLE"
    async with PostgresUnitOfWork(one_connection) as uow:
        prepared_after = await _prepared_statements(uow)
        assert len(await uow.events.load(stream)) == (2 if ending == "commit" else 1)
    if ending == "commit":
        # Switching autocommit around the transaction keeps the prepared statements.
        assert prepared_after >= prepared_before


async def test_a_cancelled_unit_of_work_leaves_the_pool_usable(one_connection: Pool) -> None:
    async def stuck() -> None:
        async with PostgresUnitOfWork(one_connection) as uow:
            await uow.inbox.mark("saga", "m-1", CLOCK.now())
            await uow.events._tx.read("SELECT pg_sleep(10)")

    task = asyncio.create_task(stuck())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    factory = PostgresUnitOfWorkFactory(one_connection)
    async with asyncio.timeout(5.0), factory() as uow:
        assert await uow.inbox.mark("saga", "m-1", CLOCK.now())  # the first mark was undone
        await uow.commit()


async def test_a_finished_unit_of_work_refuses_statements(one_connection: Pool) -> None:
    async with PostgresUnitOfWork(one_connection) as uow:
        await uow.commit()
        with pytest.raises(RuntimeError):
            await uow.events.load(uuid.uuid4())
    with pytest.raises(RuntimeError):
        await uow.events.load(uuid.uuid4())
    with pytest.raises(RuntimeError):
        async with uow:
            pass


@pytest.mark.parametrize("open_transaction", [True, False], ids=["after-a-mark", "alone"])
async def test_a_stream_behind_its_expected_version_fails_the_message_that_commits(
    one_connection: Pool, open_transaction: bool
) -> None:
    # The guard fails by an error, not a row count, so COMMIT can go in the same message:
    # nothing of the unit of work may commit with it.
    behind, fresh = await _stream_of_one_event(one_connection), uuid.uuid4()
    with pytest.raises(ConcurrencyConflict):
        async with PostgresUnitOfWork(one_connection) as uow:
            if open_transaction:
                assert await uow.inbox.mark("saga", "m-3", CLOCK.now())
            await uow.events.append(fresh, 0, [attempted(fresh, 1)])
            await uow.events.append(behind, 2, [attempted(behind, 3)])  # version 2 is missing
            await uow.commit()
    async with PostgresUnitOfWork(one_connection) as uow:
        assert (len(await uow.events.load(behind)), await uow.events.load(fresh)) == (1, [])
        assert await uow.inbox.mark("saga", "m-3", CLOCK.now())
