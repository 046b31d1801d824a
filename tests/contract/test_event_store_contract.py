"""EventStore contract: append-only streams under an optimistic lock, on every adapter."""

from __future__ import annotations

import uuid

import pytest
from contract_builders import race

from payment.application.errors import ConcurrencyConflict
from payment.application.ports import UnitOfWork, UnitOfWorkFactory
from support.events import attempted, every_event_type, initiated


async def test_an_unknown_stream_loads_empty(uow_factory: UnitOfWorkFactory) -> None:
    async with uow_factory() as uow:
        assert await uow.events.load(uuid.uuid4()) == []


async def test_events_of_every_type_round_trip_in_version_order(
    uow_factory: UnitOfWorkFactory,
) -> None:
    stream = uuid.uuid4()
    events = every_event_type(stream)
    async with uow_factory() as uow:
        await uow.events.append(stream, 0, events[:2])
        await uow.events.append(stream, 2, events[2:])
        await uow.commit()
    async with uow_factory() as uow:
        assert await uow.events.load(stream) == events


async def test_streams_are_separate(uow_factory: UnitOfWorkFactory) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    async with uow_factory() as uow:
        await uow.events.append(first, 0, [initiated(first)])
        await uow.events.append(second, 0, [initiated(second), attempted(second, 2)])
        await uow.commit()
    async with uow_factory() as uow:
        assert [e.version for e in await uow.events.load(first)] == [1]
        assert [e.version for e in await uow.events.load(second)] == [1, 2]


async def test_a_unit_of_work_reads_its_own_appends(uow_factory: UnitOfWorkFactory) -> None:
    stream = uuid.uuid4()
    async with uow_factory() as uow:
        await uow.events.append(stream, 0, [initiated(stream)])
        await uow.events.append(stream, 1, [attempted(stream, 2)])
        assert [e.version for e in await uow.events.load(stream)] == [1, 2]


async def test_appends_are_visible_to_others_only_after_commit(
    uow_factory: UnitOfWorkFactory,
) -> None:
    stream = uuid.uuid4()
    async with uow_factory() as writer:
        await writer.events.append(stream, 0, [initiated(stream)])
        async with uow_factory() as reader:
            assert await reader.events.load(stream) == []
        await writer.commit()
    async with uow_factory() as reader:
        assert len(await reader.events.load(stream)) == 1


async def test_appends_not_committed_are_lost(uow_factory: UnitOfWorkFactory) -> None:
    stream = uuid.uuid4()
    async with uow_factory() as uow:
        await uow.events.append(stream, 0, [initiated(stream)])
    with pytest.raises(LookupError):
        async with uow_factory() as uow:
            await uow.events.append(stream, 0, [initiated(stream)])
            raise LookupError("handler failed")
    async with uow_factory() as uow:
        assert await uow.events.load(stream) == []


async def _append_or_conflict(uow: UnitOfWork, stream: uuid.UUID, expected: int) -> None:
    await uow.events.append(stream, expected, [attempted(stream, expected + 1)])
    # An adapter may detect the conflict at append or only at commit.
    await uow.commit()


async def test_appending_behind_the_stream_conflicts(uow_factory: UnitOfWorkFactory) -> None:
    stream = uuid.uuid4()
    async with uow_factory() as uow:
        await uow.events.append(stream, 0, [initiated(stream), attempted(stream, 2)])
        await uow.commit()
    for stale in (0, 1):
        with pytest.raises(ConcurrencyConflict) as raised:
            async with uow_factory() as uow:
                await _append_or_conflict(uow, stream, stale)
        assert raised.value.stream_id == stream
        assert raised.value.expected_version == stale
    async with uow_factory() as uow:
        assert [e.version for e in await uow.events.load(stream)] == [1, 2]


async def test_appending_ahead_of_the_stream_conflicts(uow_factory: UnitOfWorkFactory) -> None:
    stream = uuid.uuid4()
    async with uow_factory() as uow:
        await uow.events.append(stream, 0, [initiated(stream)])
        await uow.commit()
    with pytest.raises(ConcurrencyConflict):
        async with uow_factory() as uow:
            await _append_or_conflict(uow, stream, 3)
    with pytest.raises(ConcurrencyConflict):
        async with uow_factory() as uow:
            await _append_or_conflict(uow, uuid.uuid4(), 1)


async def test_of_two_concurrent_writers_of_one_version_exactly_one_wins(
    uow_factory: UnitOfWorkFactory,
) -> None:
    stream = uuid.uuid4()
    async with uow_factory() as uow:
        await uow.events.append(stream, 0, [initiated(stream)])
        await uow.commit()
    first, second = attempted(stream, 2), attempted(stream, 2)

    async def write_first(uow: UnitOfWork) -> None:
        await uow.events.append(stream, 1, [first])

    async def write_second(uow: UnitOfWork) -> None:
        await uow.events.append(stream, 1, [second])

    outcome = await race(uow_factory, write_first, write_second)
    assert sorted(outcome) == [False, True]
    async with uow_factory() as uow:
        stored = await uow.events.load(stream)
    assert stored[1:] == ([first] if outcome[0] else [second])


@pytest.mark.parametrize("versions", [[2], [1, 3], [0]])
async def test_versions_must_continue_the_stream_without_a_gap(
    uow_factory: UnitOfWorkFactory, versions: list[int]
) -> None:
    stream = uuid.uuid4()
    with pytest.raises(ValueError, match="without a gap"):
        async with uow_factory() as uow:
            await uow.events.append(stream, 0, [attempted(stream, v) for v in versions])


async def test_events_must_belong_to_the_stream(uow_factory: UnitOfWorkFactory) -> None:
    with pytest.raises(ValueError, match="without a gap"):
        async with uow_factory() as uow:
            await uow.events.append(uuid.uuid4(), 0, [initiated(uuid.uuid4())])
