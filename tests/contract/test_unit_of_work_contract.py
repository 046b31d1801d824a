"""UnitOfWork contract: a handling commits all together or not at all, on every adapter."""

from __future__ import annotations

import uuid

import pytest

from payment.application.ports import UnitOfWork, UnitOfWorkFactory
from support.events import at, initiated, message


async def _write_a_handling(uow: UnitOfWork, stream: uuid.UUID) -> None:
    assert await uow.inbox.mark("saga", "m-1", at(0))
    await uow.payments.claim_booking("booking-1", stream, at(0))
    await uow.events.append(stream, 0, [initiated(stream)])
    await uow.outbox.add([message(str(stream))])


async def _what_is_visible(
    uow_factory: UnitOfWorkFactory, stream: uuid.UUID
) -> tuple[bool, bool, bool, bool]:
    """(events, booking claim, outbox row, inbox mark) as another unit of work sees them."""
    async with uow_factory() as uow:
        return (
            bool(await uow.events.load(stream)),
            await uow.payments.payment_for_booking("booking-1") is not None,
            bool(await uow.outbox.pending(10)),
            # Probes the mark; this unit of work is not committed, so the probe leaves none.
            not await uow.inbox.mark("saga", "m-1", at(1)),
        )


async def test_a_commit_makes_every_write_visible_together(
    uow_factory: UnitOfWorkFactory,
) -> None:
    stream = uuid.uuid4()
    async with uow_factory() as uow:
        await _write_a_handling(uow, stream)
        await uow.commit()
    assert await _what_is_visible(uow_factory, stream) == (True, True, True, True)


async def test_nothing_is_visible_before_commit(uow_factory: UnitOfWorkFactory) -> None:
    stream = uuid.uuid4()
    async with uow_factory() as uow:
        await _write_a_handling(uow, stream)
        # The inbox probe would wait for this transaction on PostgreSQL; the rest must not.
        async with uow_factory() as other:
            assert await other.events.load(stream) == []
            assert await other.payments.payment_for_booking("booking-1") is None
            assert await other.outbox.pending(10) == []
        await uow.commit()


async def test_leaving_without_commit_rolls_everything_back(
    uow_factory: UnitOfWorkFactory,
) -> None:
    stream = uuid.uuid4()
    async with uow_factory() as uow:
        await _write_a_handling(uow, stream)
    assert await _what_is_visible(uow_factory, stream) == (False, False, False, False)


async def test_an_error_rolls_everything_back(uow_factory: UnitOfWorkFactory) -> None:
    stream = uuid.uuid4()
    with pytest.raises(LookupError):
        async with uow_factory() as uow:
            await _write_a_handling(uow, stream)
            raise LookupError("handler failed after writing")
    assert await _what_is_visible(uow_factory, stream) == (False, False, False, False)


async def test_a_unit_of_work_commits_once(uow_factory: UnitOfWorkFactory) -> None:
    async with uow_factory() as uow:
        await uow.commit()
        with pytest.raises(RuntimeError):
            await uow.commit()


async def test_read_only_units_of_work_need_no_commit(uow_factory: UnitOfWorkFactory) -> None:
    stream = uuid.uuid4()
    for _ in range(3):
        async with uow_factory() as uow:
            assert await uow.events.load(stream) == []
    async with uow_factory() as uow:
        await _write_a_handling(uow, stream)
        await uow.commit()
    assert await _what_is_visible(uow_factory, stream) == (True, True, True, True)
