"""Outbox contract: committed messages come back unpublished, oldest first, none skipped."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from payment.application.commands import TraceHeaders
from payment.application.messages import OutboundMessage
from payment.application.ports import OutboxRecord, UnitOfWorkFactory
from support.events import at, message


async def _add(uow_factory: UnitOfWorkFactory, *messages: OutboundMessage) -> None:
    async with uow_factory() as uow:
        await uow.outbox.add(messages)
        await uow.commit()


async def _pending(uow_factory: UnitOfWorkFactory, limit: int = 100) -> list[OutboxRecord]:
    async with uow_factory() as uow:
        return await uow.outbox.pending(limit)


async def _publish(uow_factory: UnitOfWorkFactory, records: list[OutboxRecord]) -> None:
    async with uow_factory() as uow:
        await uow.outbox.mark_published([r.position for r in records], at(99))
        await uow.commit()


async def test_messages_round_trip(uow_factory: UnitOfWorkFactory) -> None:
    traced = message(
        "payment-1",
        kind="payment.completed",
        sequence=3,
        trace=TraceHeaders(
            traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            tracestate="vendor=opaque",
        ),
    )
    untraced = message("booking-1", kind="payment.failed", sequence=None)
    await _add(uow_factory, traced, untraced)
    rows = await _pending(uow_factory)
    assert [r.message for r in rows] == [traced, untraced]
    assert all(r.published_at is None for r in rows)


async def test_messages_are_visible_only_after_commit(uow_factory: UnitOfWorkFactory) -> None:
    async with uow_factory() as writer:
        await writer.outbox.add([message("payment-1")])
        assert await _pending(uow_factory) == []
    assert await _pending(uow_factory) == []  # rolled back
    await _add(uow_factory, message("payment-1"))
    assert len(await _pending(uow_factory)) == 1


async def test_pending_leaves_out_the_keys_it_is_told_to_skip(
    uow_factory: UnitOfWorkFactory,
) -> None:
    # The relay's keys backing off: their rows must not fill the limit.
    await _add(uow_factory, *(message("payment-bad", sequence=n) for n in range(1, 4)))
    await _add(uow_factory, message("payment-good", sequence=1), message("booking-x"))
    async with uow_factory() as uow:
        rows = await uow.outbox.pending(2, skip_keys={"payment-bad"})
    assert [r.message.key for r in rows] == ["payment-good", "booking-x"]
    async with uow_factory() as uow:
        assert [r.message.key for r in await uow.outbox.pending(10, skip_keys=())] == [
            "payment-bad"
        ] * 3 + ["payment-good", "booking-x"]


async def test_pending_leaves_out_the_positions_it_is_told_to_skip(
    uow_factory: UnitOfWorkFactory,
) -> None:
    # Rows the relay published whose mark is not committed yet; the rows after them count.
    await _add(uow_factory, *(message("payment-1", sequence=n) for n in range(1, 4)))
    async with uow_factory() as uow:
        first, second, third = await uow.outbox.pending(10)
        rows = await uow.outbox.pending(1, skip_positions={first.position, second.position})
        assert rows == [third]
        rows = await uow.outbox.pending(10, {"payment-2"}, {second.position})
        assert rows == [first, third]


async def test_pending_is_oldest_first_and_limited(uow_factory: UnitOfWorkFactory) -> None:
    for sequence in range(1, 6):
        await _add(uow_factory, message("payment-1", sequence=sequence))
    rows = await _pending(uow_factory, limit=3)
    assert [r.message.sequence for r in rows] == [1, 2, 3]
    assert [r.position for r in rows] == sorted(r.position for r in rows)
    assert len({r.position for r in rows}) == 3


async def test_messages_of_one_transaction_keep_their_order(
    uow_factory: UnitOfWorkFactory,
) -> None:
    await _add(uow_factory, *(message("payment-1", sequence=s) for s in (1, 2, 3)))
    assert [r.message.sequence for r in await _pending(uow_factory)] == [1, 2, 3]


async def test_published_rows_are_no_longer_pending(uow_factory: UnitOfWorkFactory) -> None:
    for sequence in range(1, 5):
        await _add(uow_factory, message("payment-1", sequence=sequence))
    rows = await _pending(uow_factory)
    await _publish(uow_factory, rows[:2])
    assert [r.message.sequence for r in await _pending(uow_factory)] == [3, 4]
    # Marking again, or marking unknown positions, changes nothing.
    await _publish(uow_factory, rows[:2])
    async with uow_factory() as uow:
        await uow.outbox.mark_published([], at(99))
        await uow.commit()
    assert [r.message.sequence for r in await _pending(uow_factory)] == [3, 4]


async def test_a_mark_takes_effect_only_on_commit(uow_factory: UnitOfWorkFactory) -> None:
    await _add(uow_factory, message("payment-1"))
    rows = await _pending(uow_factory)
    with pytest.raises(LookupError):
        async with uow_factory() as uow:
            await uow.outbox.mark_published([rows[0].position], at(99))
            raise LookupError("broker acknowledgement lost")
    assert await _pending(uow_factory) == rows


async def test_the_same_event_may_be_queued_again(uow_factory: UnitOfWorkFactory) -> None:
    # A re-request of a terminal payment re-publishes its outcome with the same ce_id.
    event_id = uuid.uuid4()
    outcome = message("payment-1", kind="payment.completed", sequence=3, event_id=event_id)
    await _add(uow_factory, outcome)
    await _publish(uow_factory, await _pending(uow_factory))
    await _add(uow_factory, outcome)
    again = await _pending(uow_factory)
    assert [r.message for r in again] == [outcome]


async def test_a_row_committed_late_by_a_slower_transaction_is_not_skipped(
    uow_factory: UnitOfWorkFactory,
) -> None:
    # The gap problem: the slow transaction draws its position first but commits last.
    slow_started = asyncio.Event()
    may_commit = asyncio.Event()

    async def slow_writer() -> None:
        async with uow_factory() as uow:
            await uow.outbox.add([message("payment-slow")])
            slow_started.set()
            await may_commit.wait()
            await uow.commit()

    slow = asyncio.create_task(slow_writer())
    await slow_started.wait()
    await _add(uow_factory, message("payment-fast"))
    first_pass = await _pending(uow_factory)
    assert [r.message.key for r in first_pass] == ["payment-fast"]
    await _publish(uow_factory, first_pass)
    may_commit.set()
    await slow
    second_pass = await _pending(uow_factory)
    assert [r.message.key for r in second_pass] == ["payment-slow"]
