"""Batch operations of the ports (…_many, claim_bookings, set_statuses), on every adapter,
and the batch handlers on top of them."""

from __future__ import annotations

import uuid
from collections import Counter

import pytest
from contract_builders import attempt, race

from payment.adapters.processors.fake import FakeProcessor
from payment.application.batches import execute_payments, request_payments
from payment.application.commands import ExecutePayment, InboundRef, RequestPayment, TraceHeaders
from payment.application.errors import ConcurrencyConflict, PaymentConflict
from payment.application.handlers import ExecuteResult, RequestResult
from payment.application.ports import StreamAppend, UnitOfWork, UnitOfWorkFactory
from payment.domain.payment import PaymentStatus
from support.events import at, attempted, initiated, message

# -- event store -----------------------------------------------------------------------------


async def test_load_many_returns_each_existing_stream_in_version_order(
    uow_factory: UnitOfWorkFactory,
) -> None:
    first, second, missing = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with uow_factory() as uow:
        await uow.events.append(first, 0, [initiated(first), attempted(first, 2)])
        await uow.events.append(second, 0, [initiated(second)])
        await uow.commit()
    async with uow_factory() as uow:
        found = await uow.events.load_many([second, missing, first])
        assert sorted(found) == sorted([first, second])
        assert found[first] == await uow.events.load(first)
        assert [e.version for e in found[second]] == [1]
        assert await uow.events.load_many([]) == {}


async def test_append_many_appends_to_new_and_existing_streams_together(
    uow_factory: UnitOfWorkFactory,
) -> None:
    old, new = uuid.uuid4(), uuid.uuid4()
    async with uow_factory() as uow:
        await uow.events.append(old, 0, [initiated(old)])
        await uow.commit()
    async with uow_factory() as uow:
        await uow.events.append_many(
            [
                StreamAppend(new, 0, [initiated(new, booking_id="b-2")]),
                StreamAppend(old, 1, [attempted(old, 2), attempted(old, 3)]),
            ]
        )
        await uow.commit()
    async with uow_factory() as uow:
        assert [e.version for e in await uow.events.load(old)] == [1, 2, 3]
        assert [e.version for e in await uow.events.load(new)] == [1]


@pytest.mark.parametrize("expected", [0, 2], ids=["ahead", "behind"])
async def test_append_many_is_all_or_nothing_when_one_stream_moved(
    uow_factory: UnitOfWorkFactory, expected: int
) -> None:
    fine, moved = uuid.uuid4(), uuid.uuid4()
    async with uow_factory() as uow:
        await uow.events.append(moved, 0, [initiated(moved)])
        await uow.commit()
    events = [initiated(moved)] if expected == 0 else [attempted(moved, 3)]
    with pytest.raises(ConcurrencyConflict):
        async with uow_factory() as uow:
            await uow.events.append_many(
                [StreamAppend(fine, 0, [initiated(fine)]), StreamAppend(moved, expected, events)]
            )
            await uow.commit()
    async with uow_factory() as uow:
        assert await uow.events.load(fine) == []
        assert [e.version for e in await uow.events.load(moved)] == [1]


async def test_append_many_refuses_gaps_and_a_stream_given_twice(
    uow_factory: UnitOfWorkFactory,
) -> None:
    stream = uuid.uuid4()
    async with uow_factory() as uow:
        with pytest.raises(ValueError):
            await uow.events.append_many([StreamAppend(stream, 0, [attempted(stream, 2)])])
        with pytest.raises(ValueError):
            await uow.events.append_many(
                [
                    StreamAppend(stream, 0, [initiated(stream)]),
                    StreamAppend(stream, 1, [attempted(stream, 2)]),
                ]
            )


async def test_of_append_many_and_a_concurrent_append_of_the_same_version_one_wins(
    uow_factory: UnitOfWorkFactory,
) -> None:
    stream, other = uuid.uuid4(), uuid.uuid4()
    async with uow_factory() as uow:
        await uow.events.append(stream, 0, [initiated(stream)])
        await uow.commit()

    async def batch(uow: UnitOfWork) -> None:
        await uow.events.append_many(
            [
                StreamAppend(other, 0, [initiated(other)]),
                StreamAppend(stream, 1, [attempted(stream, 2)]),
            ]
        )

    async def single(uow: UnitOfWork) -> None:
        await uow.events.append(stream, 1, [attempted(stream, 2)])

    outcome = await race(uow_factory, batch, single)
    assert sorted(outcome) == [False, True]
    async with uow_factory() as uow:
        assert [e.version for e in await uow.events.load(stream)] == [1, 2]
        assert len(await uow.events.load(other)) == (1 if outcome[0] else 0)


# -- inbox -----------------------------------------------------------------------------------


async def test_mark_many_marks_the_new_keys_once(uow_factory: UnitOfWorkFactory) -> None:
    async with uow_factory() as uow:
        assert await uow.inbox.mark("saga", "m-1", at(0))
        await uow.commit()
    async with uow_factory() as uow:
        fresh = await uow.inbox.mark_many(
            [("saga", "m-1"), ("saga", "m-2"), ("other", "m-1"), ("saga", "m-2")], at(1)
        )
        assert fresh == {("saga", "m-2"), ("other", "m-1")}
        assert not await uow.inbox.mark("saga", "m-2", at(1))
        assert await uow.inbox.mark_many([], at(1)) == set()
        await uow.commit()
    async with uow_factory() as uow:
        assert await uow.inbox.mark_many([("other", "m-1"), ("saga", "m-3")], at(2)) == {
            ("saga", "m-3")
        }


async def test_of_two_concurrent_batches_sharing_a_message_one_commits_it(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async def first(uow: UnitOfWork) -> bool:
        return len(await uow.inbox.mark_many([("s", "a"), ("s", "shared")], at(0))) == 2

    async def second(uow: UnitOfWork) -> bool:
        return len(await uow.inbox.mark_many([("s", "shared"), ("s", "z")], at(0))) == 2

    outcome = await race(uow_factory, first, second)
    # The loser sees the shared key taken (PostgreSQL, after waiting) or fails at commit.
    assert sorted(outcome) == [False, True]


# -- payment index ---------------------------------------------------------------------------


async def test_claim_bookings_claims_the_free_ones_and_reports_them(
    uow_factory: UnitOfWorkFactory,
) -> None:
    taken, p1, p2, p3 = (uuid.uuid4() for _ in range(4))
    async with uow_factory() as uow:
        await uow.payments.claim_booking("b-taken", taken, at(0))
        await uow.commit()
    async with uow_factory() as uow:
        claimed = await uow.payments.claim_bookings(
            [("b-1", p1), ("b-taken", p2), ("b-1", p3)], at(1)
        )
        assert claimed == {"b-1"}
        assert await uow.payments.claim_bookings([], at(1)) == set()
        await uow.commit()
    async with uow_factory() as uow:
        assert await uow.payments.payment_for_booking("b-1") == p1
        assert await uow.payments.payment_for_booking("b-taken") == taken


async def test_of_two_concurrent_batches_claiming_one_booking_one_commits_it(
    uow_factory: UnitOfWorkFactory,
) -> None:
    mine, theirs = uuid.uuid4(), uuid.uuid4()

    async def first(uow: UnitOfWork) -> bool:
        return await uow.payments.claim_bookings([("b-1", mine)], at(0)) == {"b-1"}

    async def second(uow: UnitOfWork) -> bool:
        return await uow.payments.claim_bookings([("b-1", theirs)], at(0)) == {"b-1"}

    outcome = await race(uow_factory, first, second)
    assert sorted(outcome) == [False, True]
    async with uow_factory() as uow:
        assert await uow.payments.payment_for_booking("b-1") == (mine if outcome[0] else theirs)


async def test_set_statuses_moves_payments_out_of_and_back_into_flight(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = [uuid.uuid4() for _ in range(3)]
    async with uow_factory() as uow:
        assert await uow.payments.claim_bookings([(f"b-{n}", p) for n, p in enumerate(ids)], at(0))
        await uow.commit()
    async with uow_factory() as uow:
        await uow.payments.set_statuses(
            [(ids[0], PaymentStatus.COMPLETED), (ids[2], PaymentStatus.INITIATED)], at(10)
        )
        await uow.payments.set_statuses([], at(10))
        await uow.commit()
    async with uow_factory() as uow:
        # Oldest change first: ids[1] (t=0), then ids[2] (moved to t=10); ids[0] is done.
        assert await uow.payments.in_flight_since(at(11), 10) == [ids[1], ids[2]]


# -- outbox ----------------------------------------------------------------------------------


async def test_many_outbox_rows_keep_their_order_bytes_and_traces(
    uow_factory: UnitOfWorkFactory,
) -> None:
    trace = TraceHeaders(traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    messages = [message(f"k-{n % 3}", sequence=n + 1, trace=trace) for n in range(9)]
    odd = message("k-odd", sequence=None)
    messages.append(odd.__class__(**{**_fields(odd), "data": b'{"t":"caf\xc3\xa9 \\u0000"}'}))
    async with uow_factory() as uow:
        await uow.outbox.add(messages)
        await uow.commit()
    async with uow_factory() as uow:
        rows = await uow.outbox.pending(100)
    assert [r.message for r in rows] == messages
    assert [r.position for r in rows] == sorted(r.position for r in rows)


async def test_outbox_rows_that_are_not_utf8_text_are_stored_as_given(
    uow_factory: UnitOfWorkFactory,
) -> None:
    base = [message(f"k-{n}") for n in range(6)]
    binary = [m.__class__(**{**_fields(m), "data": b"\xff\x00" + m.data}) for m in base]
    async with uow_factory() as uow:
        await uow.outbox.add(binary)
        await uow.commit()
    async with uow_factory() as uow:
        assert [r.message for r in await uow.outbox.pending(100)] == binary


def _fields(m: object) -> dict[str, object]:
    return {f: getattr(m, f) for f in m.__struct_fields__}  # type: ignore[attr-defined]


# -- batch handlers on every adapter ---------------------------------------------------------


def _request(booking: str, n: int, **fields: object) -> RequestPayment:
    values: dict[str, object] = {
        "amount": 2500,
        "currency": "EUR",
        "payment_method": "pm_card_visa",
    }
    values.update(fields)
    return RequestPayment(
        inbound=InboundRef(source="saga", message_id=f"req-{booking}-{n}"),
        booking_id=booking,
        **values,  # type: ignore[arg-type]
    )


class _Clock:
    def now(self):  # type: ignore[no-untyped-def]
        return at(0)


async def test_the_batch_handlers_keep_the_contract_on_every_adapter(
    uow_factory: UnitOfWorkFactory,
) -> None:
    clock = _Clock()
    processor = FakeProcessor()
    first = [_request(f"b-{n}", 0) for n in range(6)] + [_request("b-bad", 0, currency="XXX")]
    assert await request_payments(first, uow_factory, clock) == [RequestResult.ACCEPTED] * 6 + [
        RequestResult.REJECTED
    ]
    async with uow_factory() as uow:
        rows = await uow.outbox.pending(100)
    executions = [
        ExecutePayment(
            inbound=InboundRef(source="self", message_id=str(r.message.event_id)),
            payment_id=uuid.UUID(r.message.key),
        )
        for r in rows
        if r.message.type == "payment.initiated"
    ]
    results = await execute_payments(executions + executions[:2], uow_factory, processor, clock)
    assert results == [ExecuteResult.COMPLETED] * 6 + [ExecuteResult.ALREADY_TERMINAL] * 2
    assert processor.calls == 6

    again = [
        first[0],  # a redelivery
        _request("b-1", 1),  # a re-request of a finished payment
        _request("b-2", 1, amount=1),  # a re-request for other money
        _request("b-new", 0),
    ]
    results2 = await request_payments(again, uow_factory, clock)
    assert results2[0] is RequestResult.DUPLICATE
    assert results2[1] is RequestResult.REPLAYED
    assert isinstance(results2[2], PaymentConflict)
    assert results2[3] is RequestResult.ACCEPTED
    async with uow_factory() as uow:
        rows = await uow.outbox.pending(100)
    kinds = Counter(r.message.type for r in rows)
    assert kinds == Counter({"payment.initiated": 7, "payment.completed": 7, "payment.failed": 1})
    assert await attempt(uow_factory, lambda uow: uow.inbox.mark("saga", "req-b-2-1", at(1)))
