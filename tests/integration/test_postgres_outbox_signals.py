"""Outbox notifications and the single-relay lock on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import pytest_asyncio

from payment.adapters.postgres.outbox import OutboxWaiter, listen_for_outbox, wait_for_outbox
from payment.adapters.postgres.pool import Connection, Pool, connect_dedicated
from payment.adapters.postgres.relay_lock import (
    RelayLeadership,
    release_relay_lock,
    try_acquire_relay_lock,
)
from payment.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from payment.application.messages import OutboundMessage
from support.waiting import eventually


@pytest_asyncio.fixture
async def listener(database_url: str, pg_pool: Pool) -> AsyncIterator[Connection]:
    conn = await connect_dedicated(database_url)
    await listen_for_outbox(conn)
    yield conn
    await conn.close()


def _message() -> OutboundMessage:
    return OutboundMessage(
        event_id=uuid.uuid4(),
        type="payment.initiated",
        key="payment-1",
        subject="payment-1",
        sequence=1,
        time=datetime.now(UTC),
        data=b"{}",
    )


async def _add(pg_uow_factory: PostgresUnitOfWorkFactory, *, commit: bool = True) -> None:
    async with pg_uow_factory() as uow:
        await uow.outbox.add([_message()])
        if commit:
            await uow.commit()


async def test_a_committed_insert_wakes_the_listener(
    listener: Connection, pg_uow_factory: PostgresUnitOfWorkFactory
) -> None:
    assert not await wait_for_outbox(listener, 0.05)
    waiting = asyncio.create_task(wait_for_outbox(listener, 5.0))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await _add(pg_uow_factory)
    assert await waiting
    assert time.monotonic() - started < 4.0  # woken by the commit, not by the 5 s timeout


async def test_a_rolled_back_insert_wakes_nobody(
    listener: Connection, pg_uow_factory: PostgresUnitOfWorkFactory, database_url: str
) -> None:
    await _add(pg_uow_factory, commit=False)
    # Notifications arrive in commit order: a marker sent after the rollback comes first
    # only if the rollback sent nothing (no waiting for silence).
    await _notify(database_url, "marker")
    assert await _next_payload(listener) == "marker"


async def _notify(database_url: str, payload: str) -> None:
    conn = await connect_dedicated(database_url)
    try:
        await conn.execute("SELECT pg_notify('payment_outbox', %s)", (payload,))
    finally:
        await conn.close()


async def _next_payload(listener: Connection) -> str:
    async for notification in listener.notifies(timeout=10, stop_after=1):
        return notification.payload
    raise AssertionError("no notification within 10 s")


async def test_a_burst_of_commits_wakes_the_listener_once(
    listener: Connection, pg_uow_factory: PostgresUnitOfWorkFactory, database_url: str
) -> None:
    for _ in range(5):
        await _add(pg_uow_factory)
    # Received while nobody waited; the first wait consumes them all. The pause lets the
    # five notifications reach the listener's socket on a loaded machine too.
    await asyncio.sleep(0.5)
    assert await wait_for_outbox(listener, 1.0)
    # None of the five is left: the next notification is one sent after the wait.
    await _notify(database_url, "after")
    assert await _next_payload(listener) == "after"


async def test_the_waiter_connects_lazily_then_waits_for_commits(
    database_url: str, pg_uow_factory: PostgresUnitOfWorkFactory
) -> None:
    waiter = OutboxWaiter(database_url)
    try:
        started = time.monotonic()
        await waiter(5.0)  # first call: subscribes and returns at once, the caller polls
        assert time.monotonic() - started < 4.0
        started = time.monotonic()
        await waiter(0.2)
        assert time.monotonic() - started >= 0.2
        waiting = asyncio.create_task(waiter(5.0))
        await asyncio.sleep(0.05)
        await _add(pg_uow_factory)
        await asyncio.wait_for(waiting, 4.0)
    finally:
        await waiter.aclose()


async def test_only_one_session_holds_the_relay_lock(database_url: str, pg_pool: Pool) -> None:
    first = await connect_dedicated(database_url)
    second = await connect_dedicated(database_url)
    try:
        assert await try_acquire_relay_lock(first)
        assert not await try_acquire_relay_lock(second)
        await release_relay_lock(first)
        assert await try_acquire_relay_lock(second)
        assert not await try_acquire_relay_lock(first)
        # A holder that dies (its session ends) releases the lock, once the server has
        # noticed: closing returns before the backend has exited.
        await second.close()
        async with asyncio.timeout(5.0):
            while True:
                if await try_acquire_relay_lock(first):
                    break
                await asyncio.sleep(0.01)
    finally:
        await first.close()
        await second.close()


async def test_leadership_waits_for_the_current_leader(database_url: str, pg_pool: Pool) -> None:
    leadership = RelayLeadership(database_url, retry_interval=0.05)
    order: list[str] = []

    async def lead(name: str, hold: float) -> None:
        async with leadership():
            order.append(f"{name} leads")
            await asyncio.sleep(hold)
            order.append(f"{name} steps down")

    first = asyncio.create_task(lead("first", 0.3))
    await eventually(lambda: order, 10.0, what="first leads")  # seen, not assumed
    second = asyncio.create_task(lead("second", 0.0))
    await asyncio.gather(first, second)
    assert order == ["first leads", "first steps down", "second leads", "second steps down"]


async def test_a_cancelled_candidate_gives_up_cleanly(database_url: str, pg_pool: Pool) -> None:
    leadership = RelayLeadership(database_url, retry_interval=0.05)
    async with leadership():
        candidate = asyncio.create_task(leadership().__aenter__())
        await asyncio.sleep(0.1)
        candidate.cancel()
        with pytest.raises(asyncio.CancelledError):
            await candidate
    async with asyncio.timeout(5.0), leadership():
        pass
