"""Inbox contract: a message is handled once per (source, id), in memory and on PostgreSQL."""

from __future__ import annotations

import pytest
from contract_builders import attempt, race

from payment.application.errors import DuplicateMessage
from payment.application.ports import UnitOfWork, UnitOfWorkFactory
from support.events import at


async def _mark(uow: UnitOfWork, source: str = "saga", message_id: str = "m-1") -> bool:
    return await uow.inbox.mark(source, message_id, at(0))


async def test_a_message_is_marked_once(uow_factory: UnitOfWorkFactory) -> None:
    assert await attempt(uow_factory, _mark)
    assert not await attempt(uow_factory, _mark)


async def test_a_second_mark_in_one_unit_of_work_is_a_duplicate(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as uow:
        assert await _mark(uow)
        assert not await _mark(uow)


async def test_the_key_is_source_and_id(uow_factory: UnitOfWorkFactory) -> None:
    async with uow_factory() as uow:
        assert await uow.inbox.mark("saga", "m-1", at(0))
        assert await uow.inbox.mark("other-source", "m-1", at(0))
        assert await uow.inbox.mark("saga", "m-2", at(0))
        await uow.commit()
    async with uow_factory() as uow:
        assert not await uow.inbox.mark("other-source", "m-1", at(1))


async def test_a_rolled_back_mark_leaves_no_trace(uow_factory: UnitOfWorkFactory) -> None:
    with pytest.raises(LookupError):
        async with uow_factory() as uow:
            assert await _mark(uow)
            raise LookupError("handler failed")
    assert await attempt(uow_factory, _mark)


async def test_of_two_concurrent_handlings_of_one_message_exactly_one_commits(
    uow_factory: UnitOfWorkFactory,
) -> None:
    # The loser learns it either from `mark` (False: PostgreSQL waits for the winner)
    # or from `commit` (DuplicateMessage: memory finds out then).
    outcome = await race(uow_factory, _mark, _mark)
    assert sorted(outcome) == [False, True]
    assert not await attempt(uow_factory, _mark)


async def _mark_new(uow: UnitOfWork) -> None:
    await uow.inbox.mark_new([("saga", "m-1")], at(0))


async def test_a_message_expected_new_is_marked_and_a_duplicate_fails_its_unit_of_work(
    uow_factory: UnitOfWorkFactory,
) -> None:
    assert await attempt(uow_factory, _mark_new)
    assert not await _mark_one(uow_factory, "m-1")  # marked by mark_new
    # A duplicate among new messages fails the whole unit of work (here or at commit),
    # and nothing of it is kept.
    with pytest.raises(DuplicateMessage):
        async with uow_factory() as uow:
            await uow.inbox.mark_new([("saga", "m-2"), ("saga", "m-1"), ("saga", "m-2")], at(1))
            await uow.commit()
    assert await _mark_one(uow_factory, "m-2")


async def test_of_two_concurrent_handlings_expecting_a_new_message_exactly_one_commits(
    uow_factory: UnitOfWorkFactory,
) -> None:
    outcome = await race(uow_factory, _mark_new, _mark_new)
    assert sorted(outcome) == [False, True]


async def _mark_one(uow_factory: UnitOfWorkFactory, message_id: str) -> bool:
    """`mark` in a unit of work of its own, committed: False for a duplicate."""
    async with uow_factory() as uow:
        fresh = await uow.inbox.mark("saga", message_id, at(2))
        await uow.commit()
    return fresh
