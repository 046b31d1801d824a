"""Batch handlers on the in-memory unit of work: each message as its single handler would."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from payment.adapters.memory import MemoryUnitOfWork, MemoryUnitOfWorkFactory
from payment.adapters.processors.fake import FakeProcessor
from payment.application.batches import execute_payments, request_payments
from payment.application.commands import (
    ExecutePayment,
    InboundRef,
    ReconcilePayment,
    RequestPayment,
)
from payment.application.errors import PaymentConflict
from payment.application.handlers import (
    ExecuteResult,
    ExecutionPolicy,
    RequestResult,
    execute_payment,
    reconcile_payment,
    request_payment,
)
from payment.domain.events import ChargeAttempted, ChargeStarted, PaymentCompleted
from payment.domain.payment import Payment, PaymentStatus
from payment.domain.processor import (
    Approved,
    ChargeOutcome,
    ChargeRequest,
    OutcomeUnknown,
    ProcessorUnavailable,
)
from support.clock import FakeClock
from support.commands import SAGA, SELF, TRACE, request_cmd

POLICY = ExecutionPolicy(
    call_timeout_s=0.5, max_attempts=2, backoff_initial_s=0.001, backoff_max_s=0.002
)


def initiated_cmds(uows: MemoryUnitOfWorkFactory) -> list[ExecutePayment]:
    """An ExecutePayment for every payment.initiated row in the outbox (as self-consumed)."""
    return [
        ExecutePayment(
            inbound=InboundRef(source=SELF, message_id=str(r.message.event_id)),
            payment_id=uuid.UUID(r.message.key),
            trace=r.message.trace,
        )
        for r in uows.db.outbox
        if r.message.type == "payment.initiated"
    ]


def types_by_key(uows: MemoryUnitOfWorkFactory) -> Counter[tuple[str, str]]:
    return Counter((r.message.key, r.message.type) for r in uows.db.outbox)


@pytest.fixture
def uows() -> MemoryUnitOfWorkFactory:
    return MemoryUnitOfWorkFactory()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- requests --------------------------------------------------------------------------------


async def test_a_batch_of_new_requests_initiates_each_payment_in_one_transaction(
    uows: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    cmds = [request_cmd(f"BK-{n}") for n in range(20)]

    results = await request_payments(cmds, uows, clock)

    assert results == [RequestResult.ACCEPTED] * 20
    assert uows.db.commits == 1
    assert sorted(uows.db.bookings) == sorted(c.booking_id for c in cmds)
    rows = [r.message for r in uows.db.outbox]
    assert [m.type for m in rows] == ["payment.initiated"] * 20
    # In command order, each carrying its request's trace.
    assert [uows.db.bookings[c.booking_id] for c in cmds] == [uuid.UUID(m.key) for m in rows]
    assert all(m.trace == TRACE for m in rows)
    assert len(uows.db.inbox) == 20


class CountsReads(MemoryUnitOfWorkFactory):
    """Counts the unit-of-work calls that need the store's answer before commit."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()

    def __call__(self) -> MemoryUnitOfWork:
        uow = super().__call__()
        for port, name in ((uow.inbox, "mark_many"), (uow.payments, "claim_bookings")):
            setattr(port, name, self._counted(name, getattr(port, name)))
        return uow

    def _counted(self, name: str, call: Any) -> Any:
        async def counted(*args: Any) -> Any:
            self.reads[name] += 1
            return await call(*args)

        return counted


async def test_a_batch_of_new_requests_asks_the_store_nothing_before_its_commit(
    clock: FakeClock,
) -> None:
    # The common case goes in one message: no inbox or claim answer awaited first.
    uows = CountsReads()

    results = await request_payments([request_cmd(f"BK-{n}") for n in range(5)], uows, clock)

    assert results == [RequestResult.ACCEPTED] * 5
    assert uows.reads == Counter()
    assert uows.db.commits == 1


async def test_a_batch_with_a_redelivery_is_tried_as_new_once_then_the_careful_way(
    clock: FakeClock,
) -> None:
    uows = CountsReads()
    first = request_cmd("BK-1", message_id="m-1")
    await request_payments([first], uows, clock)

    results = await request_payments([request_cmd("BK-2"), first, request_cmd("BK-3")], uows, clock)

    assert results == [RequestResult.ACCEPTED, RequestResult.DUPLICATE, RequestResult.ACCEPTED]
    # The first try failed on the redelivery and kept nothing; the careful one read first.
    assert uows.reads == Counter({"mark_many": 1, "claim_bookings": 1})
    assert uows.db.commits == 2
    assert sum(1 for r in uows.db.outbox if r.message.type == "payment.initiated") == 3


async def test_redelivered_and_repeated_messages_in_a_batch_change_nothing(
    uows: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    first = request_cmd("BK-1", message_id="m-1")
    await request_payments([first], uows, clock)
    before = list(uows.db.outbox)

    results = await request_payments(
        [first, request_cmd("BK-2", message_id="m-2"), first], uows, clock
    )

    assert results == [RequestResult.DUPLICATE, RequestResult.ACCEPTED, RequestResult.DUPLICATE]
    assert uows.db.outbox[: len(before)] == before
    assert len(uows.db.outbox) == len(before) + 1


async def test_two_requests_for_one_booking_in_a_batch_make_one_payment(
    uows: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    results = await request_payments(
        [request_cmd("BK-1"), request_cmd("BK-2"), request_cmd("BK-1")], uows, clock
    )

    assert results == [RequestResult.ACCEPTED, RequestResult.ACCEPTED, RequestResult.IN_FLIGHT]
    assert types_by_key(uows) == Counter(
        {(str(uows.db.bookings[b]), "payment.initiated"): 1 for b in ("BK-1", "BK-2")}
    )


async def test_re_requests_in_a_batch_replay_or_conflict_and_the_rest_still_goes_through(
    uows: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    processor = FakeProcessor()
    await request_payments([request_cmd("BK-done"), request_cmd("BK-busy")], uows, clock)
    done = [c for c in initiated_cmds(uows) if c.payment_id == uows.db.bookings["BK-done"]]
    await execute_payments(done, uows, processor, clock)
    other_money = request_cmd("BK-done", amount=1)

    results = await request_payments(
        [request_cmd("BK-new"), request_cmd("BK-done"), other_money, request_cmd("BK-busy")],
        uows,
        clock,
    )

    assert results[0] is RequestResult.ACCEPTED
    assert results[1] is RequestResult.REPLAYED
    assert isinstance(results[2], PaymentConflict)
    assert results[3] is RequestResult.IN_FLIGHT
    # The conflicting message is not marked: the caller dead-letters it, then marks it.
    assert (SAGA, other_money.inbound.message_id) not in uows.db.inbox
    done_id = str(uows.db.bookings["BK-done"])
    assert types_by_key(uows)[(done_id, "payment.completed")] == 2  # the same event, again
    completed = [r.message for r in uows.db.outbox if r.message.type == "payment.completed"]
    assert completed[0].event_id == completed[1].event_id
    assert processor.calls == 1


async def test_an_invalid_request_in_a_batch_gets_one_invalid_request_failure(
    uows: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    results = await request_payments(
        [request_cmd("BK-1"), request_cmd("BK-2", currency="XXX"), request_cmd("BK-3")], uows, clock
    )

    assert results == [RequestResult.ACCEPTED, RequestResult.REJECTED, RequestResult.ACCEPTED]
    failed = [r.message for r in uows.db.outbox if r.message.type == "payment.failed"]
    assert [(m.key, m.subject) for m in failed] == [("BK-2", None)]
    assert "BK-2" not in uows.db.bookings
    # The batch, then the refusal on its own (its booking looked up first: contract 4.3).
    assert uows.db.commits == 2


async def test_an_invalid_re_request_in_a_batch_is_a_conflict_never_a_failure(
    uows: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    await request_payments([request_cmd("BK-paid")], uows, clock)
    await execute_payments(initiated_cmds(uows), uows, FakeProcessor(), clock)
    invalid = request_cmd("BK-paid", payment_method="")

    results = await request_payments(
        [request_cmd("BK-new"), invalid, request_cmd("BK-bad", amount=0)], uows, clock
    )

    assert results[0] is RequestResult.ACCEPTED
    assert isinstance(results[1], PaymentConflict)
    assert results[1].payment_id == uows.db.bookings["BK-paid"]
    assert "breaks a rule" in results[1].detail
    assert results[2] is RequestResult.REJECTED
    failed = [r.message.key for r in uows.db.outbox if r.message.type == "payment.failed"]
    assert failed == ["BK-bad"]


async def test_a_booking_claimed_concurrently_falls_back_and_makes_one_payment(
    uows: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    # The single handler commits first while the batch is in its transaction: the memory
    # store refuses the batch's claim at commit, and the batch falls back one by one.
    cmds = [request_cmd(f"BK-{n}") for n in range(5)]

    class Racing(MemoryUnitOfWorkFactory):
        raced = False

        def __call__(self) -> Any:
            uow = super().__call__()
            if not Racing.raced:
                Racing.raced = True
                inner_commit = uow.commit

                async def commit() -> None:
                    await request_payment(
                        request_cmd("BK-3"), MemoryUnitOfWorkFactory(uow._db), clock
                    )
                    await inner_commit()

                uow.commit = commit  # type: ignore[method-assign]
            return uow

    racing = Racing(uows.db)
    results = await request_payments(cmds, racing, clock)

    assert results[3] is RequestResult.IN_FLIGHT
    assert results[:3] + results[4:] == [RequestResult.ACCEPTED] * 4
    assert len(uows.db.bookings) == 5
    assert sum(1 for r in uows.db.outbox if r.message.type == "payment.initiated") == 5


# -- executions ------------------------------------------------------------------------------


async def test_a_batch_of_executions_charges_each_once_and_records_in_one_transaction(
    uows: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    await request_payments([request_cmd(f"BK-{n}") for n in range(10)], uows, clock)
    processor = FakeProcessor()
    commits = uows.db.commits

    results = await execute_payments(initiated_cmds(uows), uows, processor, clock, POLICY)

    assert results == [ExecuteResult.COMPLETED] * 10
    # One write-ahead (ChargeStarted) for the batch, one for the outcomes.
    assert uows.db.commits == commits + 2
    assert processor.calls == 10
    for payment_id in uows.db.bookings.values():
        events = uows.db.streams[payment_id]
        assert [type(e) for e in events[1:]] == [ChargeStarted, ChargeAttempted, PaymentCompleted]
        assert uows.db.status[payment_id][0] is PaymentStatus.COMPLETED
    completed = [r.message for r in uows.db.outbox if r.message.type == "payment.completed"]
    assert len(completed) == 10 and all(m.trace == TRACE for m in completed)


async def test_in_a_batch_only_payments_older_than_the_key_lifetime_are_looked_up_first(
    uows: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    # Gateways that forget idempotency keys (Stripe, after 24 h): an old payment's charge
    # made before a crash is found by a lookup, not made again under a forgotten key.
    looked_up: list[str] = []

    class Counting(FakeProcessor):
        async def lookup(self, request: ChargeRequest) -> ChargeOutcome | None:
            looked_up.append(request.booking_id)
            return await super().lookup(request)

    await request_payments([request_cmd("BK-old")], uows, clock)
    clock.advance(2 * 3600)
    await request_payments([request_cmd("BK-new")], uows, clock)
    processor = Counting()
    policy = msgspec.structs.replace(POLICY, key_lifetime_s=3600.0)

    results = await execute_payments(initiated_cmds(uows), uows, processor, clock, policy)

    assert results == [ExecuteResult.COMPLETED] * 2
    assert looked_up == ["BK-old"]
    assert processor.calls == 2


async def test_unknown_finished_and_redelivered_executions_in_a_batch(
    uows: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    await request_payments([request_cmd("BK-1"), request_cmd("BK-2")], uows, clock)
    processor = FakeProcessor()
    first, second = initiated_cmds(uows)
    await execute_payments([first], uows, processor, clock)
    unknown = ExecutePayment(
        inbound=InboundRef(source=SELF, message_id="m-x"), payment_id=uuid.uuid4()
    )
    again = ExecutePayment(
        inbound=InboundRef(source=SELF, message_id="m-y"), payment_id=first.payment_id
    )

    results = await execute_payments(
        [unknown, first, second, again, second], uows, processor, clock
    )

    assert results == [
        ExecuteResult.NOT_FOUND,
        ExecuteResult.ALREADY_TERMINAL,
        ExecuteResult.COMPLETED,
        ExecuteResult.ALREADY_TERMINAL,
        ExecuteResult.ALREADY_TERMINAL,  # the same message again, after its outcome
    ]
    assert processor.calls == 2
    assert (SELF, "m-x") in uows.db.inbox and (SELF, "m-y") in uows.db.inbox


async def test_an_outcome_written_meanwhile_wins_and_the_batch_falls_back(
    uows: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    await request_payments([request_cmd("BK-1"), request_cmd("BK-2")], uows, clock)
    cmds = initiated_cmds(uows)
    processor = FakeProcessor()

    class Interloper(FakeProcessor):
        async def charge(self, request: ChargeRequest) -> ChargeOutcome:
            outcome = await processor.charge(request)
            if request.booking_id == "BK-1":
                # The reconciler finds the charge and records its outcome first (another
                # execution would find the batch's charge under way: ChargeStarted).
                other = ReconcilePayment(payment_id=request.payment_id)
                assert await reconcile_payment(other, uows, processor, clock) is (
                    ExecuteResult.COMPLETED
                )
            return outcome

    results = await execute_payments(cmds, uows, Interloper(), clock)

    assert results == [ExecuteResult.ALREADY_TERMINAL, ExecuteResult.COMPLETED]
    assert Counter(t for _, t in types_by_key(uows)) == Counter(
        {"payment.initiated": 2, "payment.completed": 2}
    )
    assert len(processor.charges) == 2  # one charge per payment, whoever recorded it


async def test_a_slow_charge_holds_back_only_its_own_outcome(
    uows: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    await request_payments(
        [request_cmd("BK-fast-1"), request_cmd("BK-slow"), request_cmd("BK-fast-2")], uows, clock
    )
    release = asyncio.Event()

    class OneSlow(FakeProcessor):
        async def charge(self, request: ChargeRequest) -> ChargeOutcome:
            if request.booking_id == "BK-slow":
                await release.wait()
            return await super().charge(request)

    task = asyncio.create_task(execute_payments(initiated_cmds(uows), uows, OneSlow(), clock))
    for _ in range(50):
        await asyncio.sleep(0)
    recorded = {
        b for b, p in uows.db.bookings.items() if uows.db.status[p][0] is PaymentStatus.COMPLETED
    }
    assert recorded == {"BK-fast-1", "BK-fast-2"}
    release.set()
    assert await task == [ExecuteResult.COMPLETED] * 3


class Trouble(FakeProcessor):
    """Unavailable for some bookings, outcome unknown for others."""

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        if request.booking_id.startswith("BK-down"):
            raise ProcessorUnavailable("503")
        if request.booking_id.startswith("BK-lost"):
            await super().charge(request)
            raise OutcomeUnknown("connection reset")
        return await super().charge(request)


async def test_unavailable_and_unknown_outcomes_in_a_batch_are_as_one_by_one(
    uows: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    await request_payments(
        [request_cmd("BK-down"), request_cmd("BK-lost"), request_cmd("BK-ok")], uows, clock
    )

    results = await execute_payments(initiated_cmds(uows), uows, Trouble(), clock, POLICY)

    assert results == [ExecuteResult.FAILED, ExecuteResult.UNKNOWN, ExecuteResult.COMPLETED]
    down = Payment.replay(uows.db.streams[uows.db.bookings["BK-down"]])
    lost = Payment.replay(uows.db.streams[uows.db.bookings["BK-lost"]])
    assert down.status is PaymentStatus.FAILED and down.attempts == POLICY.max_attempts
    assert lost.status is PaymentStatus.INITIATED and lost.charge_may_have_happened
    assert uows.db.status[lost.id][0] is PaymentStatus.INITIATED


async def test_the_scope_is_entered_around_each_charge(
    uows: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    await request_payments([request_cmd("BK-1"), request_cmd("BK-2")], uows, clock)
    cmds = initiated_cmds(uows)
    entered: list[uuid.UUID] = []
    inside: list[bool] = []
    current: list[uuid.UUID] = []

    @contextlib.contextmanager
    def scope(cmd: ExecutePayment) -> Iterator[None]:
        entered.append(cmd.payment_id)
        current.append(cmd.payment_id)
        yield
        current.remove(cmd.payment_id)

    class Watching(FakeProcessor):
        async def charge(self, request: ChargeRequest) -> ChargeOutcome:
            inside.append(request.payment_id in current)
            return Approved(provider_reference="ref")

    await execute_payments(cmds, uows, Watching(), clock, scope=scope)

    assert sorted(entered) == sorted(c.payment_id for c in cmds)
    assert inside == [True, True]


# -- equivalence -----------------------------------------------------------------------------


def _fingerprint(uows: MemoryUnitOfWorkFactory) -> tuple[object, ...]:
    """What a batch must leave exactly as the single handlers do (ids aside)."""
    by_booking = {}
    for booking, payment_id in uows.db.bookings.items():
        by_booking[booking] = (
            [type(e).__name__ for e in uows.db.streams[payment_id]],
            uows.db.status[payment_id][0],
        )
    keys = {str(p): b for b, p in uows.db.bookings.items()}
    rows = Counter((keys.get(r.message.key, r.message.key), r.message.type) for r in uows.db.outbox)
    # Our own events' ids differ between the two runs: count those marks.
    inbox = sorted(k for k in uows.db.inbox if k[0] == SAGA)
    return by_booking, rows, inbox, sum(1 for k in uows.db.inbox if k[0] == SELF)


@pytest.mark.parametrize("seed", range(12))
async def test_batches_leave_what_one_by_one_handling_leaves(seed: int) -> None:
    rng = random.Random(seed)
    bookings = [f"BK-{n}" for n in range(8)]
    messages: list[RequestPayment] = []
    for n in range(30):
        booking = rng.choice(bookings)
        kind = rng.random()
        if kind < 0.15 and messages:
            messages.append(rng.choice(messages))  # a redelivery
        elif kind < 0.25:
            messages.append(
                request_cmd(booking, message_id=f"m{seed}-{n}", amount=rng.choice([1, 2]))
            )
        elif kind < 0.3:
            messages.append(request_cmd(booking, message_id=f"m{seed}-{n}", currency="XXX"))
        else:
            messages.append(request_cmd(booking, message_id=f"m{seed}-{n}"))
    chunks: list[list[RequestPayment]] = []
    rest = list(messages)
    while rest:
        size = rng.randint(1, 8)
        chunks.append(rest[:size])
        rest = rest[size:]

    single, batched = MemoryUnitOfWorkFactory(), MemoryUnitOfWorkFactory()
    clock = FakeClock()
    single_results: list[object] = []
    batch_results: list[object] = []
    for chunk in chunks:
        for cmd in chunk:
            try:
                single_results.append(await request_payment(cmd, single, clock))
            except PaymentConflict:
                single_results.append("conflict")
        batch_results += [
            "conflict" if isinstance(r, PaymentConflict) else r
            for r in await request_payments(chunk, batched, clock)
        ]
        # Execute what was initiated so far, in random-size batches, for both.
        processor_a, processor_b = Trouble(), Trouble()
        done_a = {
            (r.message.key) for r in single.db.outbox if r.message.type != "payment.initiated"
        }
        for cmd in initiated_cmds(single):
            if str(cmd.payment_id) not in done_a:
                await execute_payment(cmd, single, processor_a, clock, POLICY)
        pending = initiated_cmds(batched)
        rng.shuffle(pending)
        while pending:
            size = rng.randint(1, 6)
            await execute_payments(pending[:size], batched, processor_b, clock, POLICY)
            pending = pending[size:]
        clock.advance(1)

    assert batch_results == single_results
    assert _fingerprint(batched) == _fingerprint(single)
