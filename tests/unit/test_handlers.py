"""Command handlers on the in-memory unit of work and fake gateways: contract section 4."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import msgspec
import pytest

from payment.adapters.memory import MemoryUnitOfWorkFactory
from payment.adapters.processors.fake import DECLINE_CODES, FakeProcessor
from payment.application.commands import (
    ExecutePayment,
    InboundRef,
    ReconcilePayment,
)
from payment.application.errors import PaymentConflict
from payment.application.handlers import (
    ExecuteResult,
    ExecutionPolicy,
    RequestPolicy,
    RequestResult,
    execute_payment,
    reconcile_payment,
    request_payment,
)
from payment.application.messages import OutboundMessage
from payment.domain.events import (
    AnyPaymentEvent,
    ChargeAttempted,
    PaymentCompleted,
    PaymentFailed,
    PaymentFlaggedForReview,
    PaymentInitiated,
)
from payment.domain.payment import Payment, PaymentStatus
from payment.domain.processor import (
    Approved,
    ChargeOutcome,
    ChargeRequest,
    Declined,
    OutcomeUnknown,
    ProcessorUnavailable,
)
from support.clock import FakeClock
from support.commands import SELF, TRACE, request_cmd

POLICY = ExecutionPolicy(
    call_timeout_s=0.05,
    max_attempts=3,
    backoff_initial_s=0.001,
    backoff_max_s=0.002,
    review_after_s=600.0,
)
TERMINAL = ("payment.completed", "payment.failed")


# -- test doubles ----------------------------------------------------------------------------


class ScriptedGateway:
    """A gateway that is idempotent per key, with scripted trouble before it answers.

    `script` holds, per call to `charge`, what goes wrong: "unavailable" (no charge made),
    "lost" (the charge is made but the answer never arrives), "slow" (no answer within the
    call timeout; the charge is made) or None (answer normally). After the script, it answers.
    """

    name = "scripted"

    def __init__(
        self,
        *script: str | None,
        decline: bool = False,
        supports_lookup: bool = True,
        lookup_unavailable: bool = False,
    ) -> None:
        self.script = list(script)
        self.decline = decline
        self.supports_lookup = supports_lookup
        self.lookup_unavailable = lookup_unavailable
        self.lookup_in_progress = False
        self.ledger: dict[uuid.UUID, ChargeOutcome] = {}
        # Charges whose key the gateway no longer honours (Stripe's 24 h): a charge under
        # that key makes a new one; a lookup (by payment) still finds them.
        self.expired: dict[uuid.UUID, ChargeOutcome] = {}
        self.keys_seen: list[uuid.UUID] = []
        self.charge_calls = 0
        self.lookup_calls = 0

    @property
    def charges_made(self) -> int:
        return len(self.ledger) + len(self.expired)

    def forget_keys(self) -> None:
        self.expired.update(self.ledger)
        self.ledger.clear()

    def _book(self, request: ChargeRequest) -> ChargeOutcome:
        if request.idempotency_key not in self.ledger:
            self.ledger[request.idempotency_key] = (
                Declined(code="insufficient_funds", message="no")
                if self.decline
                else Approved(provider_reference=f"ch_{request.idempotency_key.hex[:12]}")
            )
        return self.ledger[request.idempotency_key]

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        self.charge_calls += 1
        self.keys_seen.append(request.idempotency_key)
        trouble = self.script.pop(0) if self.script else None
        if trouble == "unavailable":
            raise ProcessorUnavailable("gateway returned 503 before charging")
        outcome = self._book(request)
        if trouble == "lost":
            raise OutcomeUnknown("connection reset after the request was sent")
        if trouble == "slow":
            await asyncio.sleep(10)
        return outcome

    async def lookup(self, request: ChargeRequest) -> ChargeOutcome | None:
        self.lookup_calls += 1
        if self.lookup_unavailable:
            raise ProcessorUnavailable("gateway down")
        if self.lookup_in_progress:
            raise OutcomeUnknown("the charge is still processing")
        if not self.supports_lookup:
            return None
        key = request.idempotency_key
        return self.ledger.get(key) or self.expired.get(key)


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture
def uow_factory() -> MemoryUnitOfWorkFactory:
    return MemoryUnitOfWorkFactory()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def outbox(uow_factory: MemoryUnitOfWorkFactory) -> list[OutboundMessage]:
    return [record.message for record in uow_factory.db.outbox]


def of_type(uow_factory: MemoryUnitOfWorkFactory, *types: str) -> list[OutboundMessage]:
    return [m for m in outbox(uow_factory) if m.type in types]


def data(message: OutboundMessage) -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.json.decode(message.data)
    return decoded


def stream(uow_factory: MemoryUnitOfWorkFactory, payment_id: uuid.UUID) -> list[AnyPaymentEvent]:
    return list(uow_factory.db.streams.get(payment_id, []))


def payment_of(uow_factory: MemoryUnitOfWorkFactory, booking_id: str) -> Payment:
    return Payment.replay(uow_factory.db.streams[uow_factory.db.bookings[booking_id]])


async def initiate(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock, booking_id: str = "BK-1001"
) -> uuid.UUID:
    assert await request_payment(request_cmd(booking_id), uow_factory, clock) is (
        RequestResult.ACCEPTED
    )
    return uow_factory.db.bookings[booking_id]


def execute_cmd(payment_id: uuid.UUID, message_id: str | None = None) -> ExecutePayment:
    # The executor consumes payment.initiated: its ce_id is the PaymentInitiated event id.
    return ExecutePayment(
        inbound=InboundRef(source=SELF, message_id=message_id or f"init-{payment_id}"),
        payment_id=payment_id,
    )


def kinds(events: list[AnyPaymentEvent]) -> list[str]:
    return [type(e).__name__ for e in events]


# -- request_payment ---------------------------------------------------------------------------


async def test_a_new_request_initiates_one_payment_and_queues_one_payment_initiated(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    result = await request_payment(request_cmd("BK-1001"), uow_factory, clock)

    assert result is RequestResult.ACCEPTED
    [message] = outbox(uow_factory)
    payment_id = uow_factory.db.bookings["BK-1001"]
    [event] = stream(uow_factory, payment_id)
    assert isinstance(event, PaymentInitiated)
    assert message.type == "payment.initiated"
    assert message.event_id == event.event_id
    assert message.key == message.subject == str(payment_id)
    assert message.sequence == 1
    assert message.trace == TRACE
    assert data(message) == {
        "payment_id": str(payment_id),
        "booking_id": "BK-1001",
        "saga_id": "saga-7",
        "amount": 12_500,
        "currency": "EUR",
        "customer_id": "cus_42",
        "initiated_at": "2026-03-01T12:00:00Z",
        "version": 1,
    }
    assert b"pm_card_visa" not in message.data
    assert event.payment_method == "pm_card_visa"
    assert uow_factory.db.status[payment_id][0] is PaymentStatus.INITIATED


async def test_a_redelivered_request_changes_nothing(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    cmd = request_cmd("BK-1001", message_id="m-1")
    await request_payment(cmd, uow_factory, clock)
    commits, rows, streams = (
        uow_factory.db.commits,
        outbox(uow_factory),
        dict(uow_factory.db.streams),
    )

    result = await request_payment(cmd, uow_factory, clock)

    assert result is RequestResult.DUPLICATE
    assert uow_factory.db.commits == commits
    assert outbox(uow_factory) == rows
    assert uow_factory.db.streams == streams


async def test_a_redelivered_request_for_a_finished_payment_publishes_nothing(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    cmd = request_cmd("BK-1001", message_id="m-1")
    await request_payment(cmd, uow_factory, clock)
    payment_id = uow_factory.db.bookings["BK-1001"]
    await execute_payment(execute_cmd(payment_id), uow_factory, FakeProcessor(), clock, POLICY)
    rows = outbox(uow_factory)

    assert await request_payment(cmd, uow_factory, clock) is RequestResult.DUPLICATE
    assert outbox(uow_factory) == rows


async def test_the_same_message_id_from_another_source_is_another_message(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    await request_payment(request_cmd("BK-1001", message_id="m-1"), uow_factory, clock)

    result = await request_payment(
        request_cmd("BK-1001", message_id="m-1", source="other-orchestrator"), uow_factory, clock
    )

    assert result is RequestResult.IN_FLIGHT
    assert ("other-orchestrator", "m-1") in uow_factory.db.inbox


@pytest.mark.parametrize("mode", ["success", "fail"])
async def test_a_re_request_for_a_finished_payment_republishes_its_outcome_unchanged(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock, mode: str
) -> None:
    processor = FakeProcessor(mode=mode)  # type: ignore[arg-type]
    payment_id = await initiate(uow_factory, clock)
    await execute_payment(execute_cmd(payment_id), uow_factory, processor, clock, POLICY)
    [original] = of_type(uow_factory, *TERMINAL)
    clock.advance(60)

    result = await request_payment(request_cmd("BK-1001", saga_id="saga-other"), uow_factory, clock)

    assert result is RequestResult.REPLAYED
    first, again = of_type(uow_factory, *TERMINAL)
    assert first == original
    assert again.event_id == original.event_id
    assert again.data == original.data
    assert (again.type, again.key, again.sequence, again.time) == (
        original.type,
        original.key,
        original.sequence,
        original.time,
    )
    assert processor.calls == 1
    assert len(stream(uow_factory, payment_id)) == 4


async def test_a_re_request_while_in_flight_publishes_nothing(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    payment_id = await initiate(uow_factory, clock)
    rows = outbox(uow_factory)

    result = await request_payment(request_cmd("BK-1001"), uow_factory, clock)

    assert result is RequestResult.IN_FLIGHT
    assert outbox(uow_factory) == rows
    assert len(stream(uow_factory, payment_id)) == 1
    assert list(uow_factory.db.bookings) == ["BK-1001"]


# A re-request meets the payment still in flight, or finished.
in_flight_or_finished = pytest.mark.parametrize(
    "finished", [False, True], ids=["in-flight", "finished"]
)


async def re_request_is_a_conflict_that_changes_nothing(
    uow_factory: MemoryUnitOfWorkFactory,
    clock: FakeClock,
    finished: bool,
    fields: dict[str, Any],
) -> PaymentConflict:
    """Re-request BK-1001 (initiated, and executed if `finished`) with `fields` changed:
    the request raises PaymentConflict naming the payment, and no row, commit or inbox
    entry is written. Returns the conflict."""
    payment_id = await initiate(uow_factory, clock)
    if finished:
        await execute_payment(execute_cmd(payment_id), uow_factory, FakeProcessor(), clock, POLICY)
    rows, commits = outbox(uow_factory), uow_factory.db.commits
    cmd = request_cmd("BK-1001", **fields)

    with pytest.raises(PaymentConflict) as caught:
        await request_payment(cmd, uow_factory, clock)

    assert caught.value.payment_id == payment_id
    assert outbox(uow_factory) == rows
    assert uow_factory.db.commits == commits
    assert (cmd.inbound.source, cmd.inbound.message_id) not in uow_factory.db.inbox
    return caught.value


@pytest.mark.parametrize(
    "change", [{"amount": 12_501}, {"currency": "USD"}, {"amount": 1, "currency": "JPY"}]
)
@in_flight_or_finished
async def test_a_re_request_for_other_money_is_a_conflict_and_changes_nothing(
    uow_factory: MemoryUnitOfWorkFactory,
    clock: FakeClock,
    change: dict[str, Any],
    finished: bool,
) -> None:
    await re_request_is_a_conflict_that_changes_nothing(uow_factory, clock, finished, change)


@pytest.mark.parametrize(
    "fields",
    [
        {"amount": 0},
        {"amount": True},
        {"amount": None},
        {"currency": "XXX"},
        {"payment_method": "4242 4242 4242 4242"},
        {"payment_method": ""},
        {"customer_id": "c" * 65},
    ],
)
async def test_an_invalid_request_gets_one_invalid_request_failure_and_no_payment(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock, fields: dict[str, Any]
) -> None:
    processor = FakeProcessor()
    cmd = request_cmd("BK-2001", **fields)

    result = await request_payment(cmd, uow_factory, clock)
    for message in of_type(uow_factory, "payment.initiated"):
        await execute_payment(
            execute_cmd(uuid.UUID(message.key)), uow_factory, processor, clock, POLICY
        )

    assert result is RequestResult.REJECTED
    [message] = outbox(uow_factory)
    body = data(message)
    assert message.type == "payment.failed"
    assert message.key == "BK-2001" and message.sequence is None
    assert body["reason"] == "invalid_request"
    assert body["booking_id"] == "BK-2001" and body["saga_id"] == "saga-7"
    assert "payment_id" not in body and "version" not in body
    assert body["detail"]
    assert b"4242" not in message.data
    assert uow_factory.db.streams == {} and uow_factory.db.bookings == {}
    assert processor.calls == 0
    assert await request_payment(cmd, uow_factory, clock) is RequestResult.DUPLICATE
    assert len(outbox(uow_factory)) == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"amount": 0},
        {"amount": None},
        {"currency": "XXX"},
        {"payment_method": "4242 4242 4242 4242"},
        {"payment_method": ""},
        {"saga_id": "s" * 65},
    ],
)
@in_flight_or_finished
async def test_an_invalid_re_request_is_a_conflict_and_never_fails_the_booking(
    uow_factory: MemoryUnitOfWorkFactory,
    clock: FakeClock,
    fields: dict[str, Any],
    finished: bool,
) -> None:
    # Contract 4.3: a booking that has a payment never gets a payment.failed it did not
    # earn; the broken request is dead-lettered, saying why.
    conflict = await re_request_is_a_conflict_that_changes_nothing(
        uow_factory, clock, finished, fields
    )

    assert conflict.detail.startswith("re-request for a booking that has a payment breaks a rule: ")
    assert "4242" not in conflict.detail


async def test_card_numbers_in_the_ids_of_an_accepted_request_are_masked_on_every_event(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    # customer_id and saga_id are echoed on every outcome: a card number in them is
    # masked before it is stored (contract 3), as a rejection masks it.
    cmd = request_cmd(
        "BK-1001", customer_id="cus 4242 4242 4242 4242", saga_id="saga-4111-1111-1111-1111"
    )
    assert await request_payment(cmd, uow_factory, clock) is RequestResult.ACCEPTED
    payment_id = uow_factory.db.bookings["BK-1001"]
    await execute_payment(execute_cmd(payment_id), uow_factory, FakeProcessor(), clock, POLICY)

    initiated, completed = outbox(uow_factory)
    assert data(initiated)["customer_id"] == "cus [REDACTED CARD]"
    assert data(initiated)["saga_id"] == data(completed)["saga_id"] == "saga-[REDACTED CARD]"
    stored = msgspec.json.encode(stream(uow_factory, payment_id))
    for raw in (initiated.data, completed.data, stored):
        assert b"4242" not in raw and b"1111" not in raw


async def test_the_configured_max_amount_applies(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    request_policy = RequestPolicy(max_amount=10_000)

    assert await request_payment(
        request_cmd("BK-1", amount=10_000), uow_factory, clock, request_policy
    ) is (RequestResult.ACCEPTED)
    assert await request_payment(
        request_cmd("BK-2", amount=10_001), uow_factory, clock, request_policy
    ) is (RequestResult.REJECTED)


async def test_concurrent_requests_for_one_booking_initiate_one_payment(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    results = await asyncio.gather(
        *(request_payment(request_cmd("BK-1001"), uow_factory, clock) for _ in range(20))
    )

    assert results.count(RequestResult.ACCEPTED) == 1
    assert set(results) <= {RequestResult.ACCEPTED, RequestResult.IN_FLIGHT}
    assert len(of_type(uow_factory, "payment.initiated")) == 1
    assert len(uow_factory.db.streams) == 1


# -- execute_payment ---------------------------------------------------------------------------


async def test_an_approved_charge_completes_the_payment(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    processor = FakeProcessor(mode="success")
    payment_id = await initiate(uow_factory, clock)
    clock.advance(2)

    result = await execute_payment(execute_cmd(payment_id), uow_factory, processor, clock, POLICY)

    assert result is ExecuteResult.COMPLETED
    events = stream(uow_factory, payment_id)
    assert kinds(events) == [
        "PaymentInitiated",
        "ChargeStarted",
        "ChargeAttempted",
        "PaymentCompleted",
    ]
    attempt, done = events[2], events[3]
    assert isinstance(attempt, ChargeAttempted) and attempt.result == "approved"
    assert isinstance(done, PaymentCompleted)
    [message] = of_type(uow_factory, *TERMINAL)
    assert message.type == "payment.completed"
    assert message.event_id == done.event_id and message.sequence == 4
    assert data(message) == {
        "payment_id": str(payment_id),
        "booking_id": "BK-1001",
        "saga_id": "saga-7",
        "amount": 12_500,
        "currency": "EUR",
        "processor": "fake",
        "provider_reference": done.provider_reference,
        "completed_at": "2026-03-01T12:00:02Z",
        "version": 4,
    }
    assert done.provider_reference.startswith("fake_")
    assert uow_factory.db.status[payment_id][0] is PaymentStatus.COMPLETED
    assert processor.calls == 1


async def test_a_declined_charge_fails_the_payment_as_declined_with_the_code(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    payment_id = await initiate(uow_factory, clock)

    result = await execute_payment(
        execute_cmd(payment_id), uow_factory, FakeProcessor(mode="fail"), clock, POLICY
    )

    assert result is ExecuteResult.FAILED
    outcome = stream(uow_factory, payment_id)[-1]
    assert isinstance(outcome, PaymentFailed)
    assert outcome.reason == "declined"
    assert outcome.decline_code in {code for code, _ in DECLINE_CODES}
    [message] = of_type(uow_factory, *TERMINAL)
    body = data(message)
    assert message.type == "payment.failed"
    assert body["reason"] == "declined"
    assert outcome.decline_code in body["detail"]
    assert (body["payment_id"], body["version"], body["saga_id"]) == (str(payment_id), 4, "saga-7")
    assert uow_factory.db.status[payment_id][0] is PaymentStatus.FAILED


async def test_an_unavailable_processor_is_retried_then_the_payment_fails(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    gateway = ScriptedGateway(*["unavailable"] * 10)
    payment_id = await initiate(uow_factory, clock)

    result = await execute_payment(execute_cmd(payment_id), uow_factory, gateway, clock, POLICY)

    assert result is ExecuteResult.FAILED
    assert gateway.charge_calls == POLICY.max_attempts
    events = stream(uow_factory, payment_id)
    attempts = [e for e in events if isinstance(e, ChargeAttempted)]
    assert [a.result for a in attempts] == ["unavailable"] * POLICY.max_attempts
    assert [a.attempt for a in attempts] == list(range(1, POLICY.max_attempts + 1))
    assert isinstance(events[-1], PaymentFailed)
    assert events[-1].reason == "processor_unavailable"
    [message] = of_type(uow_factory, *TERMINAL)
    assert data(message)["reason"] == "processor_unavailable"
    assert gateway.charges_made == 0


async def test_a_processor_that_recovers_within_the_attempts_completes_the_payment(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    gateway = ScriptedGateway("unavailable", "unavailable")
    payment_id = await initiate(uow_factory, clock)

    result = await execute_payment(execute_cmd(payment_id), uow_factory, gateway, clock, POLICY)

    assert result is ExecuteResult.COMPLETED
    assert gateway.charge_calls == 3
    results = [e.result for e in stream(uow_factory, payment_id) if isinstance(e, ChargeAttempted)]
    assert results == ["unavailable", "unavailable", "approved"]


@pytest.mark.parametrize("trouble", ["lost", "slow"])
async def test_an_unknown_outcome_leaves_the_payment_in_flight_without_an_outcome(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock, trouble: str
) -> None:
    gateway = ScriptedGateway(trouble)
    payment_id = await initiate(uow_factory, clock)

    result = await execute_payment(execute_cmd(payment_id), uow_factory, gateway, clock, POLICY)

    assert result is ExecuteResult.UNKNOWN
    assert gateway.charge_calls == 1, "an unknown outcome is not retried blindly"
    events = stream(uow_factory, payment_id)
    assert kinds(events) == ["PaymentInitiated", "ChargeStarted", "ChargeAttempted"]
    assert isinstance(events[2], ChargeAttempted) and events[2].result == "unknown"
    assert of_type(uow_factory, *TERMINAL) == []
    assert payment_of(uow_factory, "BK-1001").status is PaymentStatus.INITIATED
    async with uow_factory() as uow:
        in_flight = await uow.payments.in_flight_since(clock.now() + timedelta(seconds=1), 10)
    assert in_flight == [payment_id]


async def test_executing_a_finished_payment_charges_nothing(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    processor = FakeProcessor()
    payment_id = await initiate(uow_factory, clock)
    await execute_payment(execute_cmd(payment_id), uow_factory, processor, clock, POLICY)
    rows = outbox(uow_factory)

    again = await execute_payment(
        execute_cmd(payment_id, message_id="another"), uow_factory, processor, clock, POLICY
    )
    redelivered = await execute_payment(
        execute_cmd(payment_id), uow_factory, processor, clock, POLICY
    )

    assert again is ExecuteResult.ALREADY_TERMINAL
    assert redelivered is ExecuteResult.ALREADY_TERMINAL
    assert processor.calls == 1
    assert outbox(uow_factory) == rows
    assert len(stream(uow_factory, payment_id)) == 4


async def test_executing_an_unknown_payment_is_not_found_and_charges_nothing(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    processor = FakeProcessor()

    result = await execute_payment(execute_cmd(uuid.uuid4()), uow_factory, processor, clock, POLICY)

    assert result is ExecuteResult.NOT_FOUND
    assert processor.calls == 0
    assert outbox(uow_factory) == []


@pytest.mark.parametrize("same_message", [True, False], ids=["redeliveries", "several-instances"])
async def test_concurrent_executions_record_one_outcome_and_charge_once(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock, same_message: bool
) -> None:
    processor = FakeProcessor(latency_ms=1)
    payment_id = await initiate(uow_factory, clock)

    results = await asyncio.gather(
        *(
            execute_payment(
                execute_cmd(payment_id, None if same_message else f"copy-{i}"),
                uow_factory,
                processor,
                clock,
                POLICY,
            )
            for i in range(20)
        )
    )

    assert results.count(ExecuteResult.COMPLETED) == 1
    assert set(results) <= {
        ExecuteResult.COMPLETED,
        ExecuteResult.DUPLICATE,
        ExecuteResult.ALREADY_TERMINAL,
        ExecuteResult.BUSY,  # found another execution's charge under way
    }
    assert len(of_type(uow_factory, *TERMINAL)) == 1
    events = stream(uow_factory, payment_id)
    assert sum(isinstance(e, PaymentCompleted | PaymentFailed) for e in events) == 1
    assert len(processor.charges) == 1


# -- reconcile_payment -------------------------------------------------------------------------


async def _unknown_payment(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock, gateway: ScriptedGateway
) -> uuid.UUID:
    payment_id = await initiate(uow_factory, clock)
    result = await execute_payment(execute_cmd(payment_id), uow_factory, gateway, clock, POLICY)
    assert result is ExecuteResult.UNKNOWN
    return payment_id


@pytest.mark.parametrize("decline", [False, True], ids=["approved", "declined"])
async def test_reconcile_resolves_an_unknown_outcome_by_lookup_without_charging_again(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock, decline: bool
) -> None:
    gateway = ScriptedGateway("lost", decline=decline)
    payment_id = await _unknown_payment(uow_factory, clock, gateway)

    result = await reconcile_payment(
        ReconcilePayment(payment_id=payment_id), uow_factory, gateway, clock, POLICY
    )

    assert result is (ExecuteResult.FAILED if decline else ExecuteResult.COMPLETED)
    assert gateway.charge_calls == 1
    assert gateway.charges_made == 1
    [message] = of_type(uow_factory, *TERMINAL)
    charged = gateway.ledger[gateway.keys_seen[0]]
    if isinstance(charged, Declined):
        assert data(message)["reason"] == "declined"
    else:
        assert data(message)["provider_reference"] == charged.provider_reference
    events = stream(uow_factory, payment_id)
    assert kinds(events) == [
        "PaymentInitiated",
        "ChargeStarted",
        "ChargeAttempted",
        "ChargeAttempted",  # the lookup's: no new charge was started
        "PaymentFailed" if decline else "PaymentCompleted",
    ]


async def test_reconcile_without_lookup_charges_again_with_the_same_key_and_charges_once(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    gateway = ScriptedGateway("lost", supports_lookup=False)
    payment_id = await _unknown_payment(uow_factory, clock, gateway)

    result = await reconcile_payment(
        ReconcilePayment(payment_id=payment_id), uow_factory, gateway, clock, POLICY
    )

    assert result is ExecuteResult.COMPLETED
    assert gateway.charge_calls == 2
    initiated = stream(uow_factory, payment_id)[0]
    assert isinstance(initiated, PaymentInitiated)
    assert gateway.keys_seen == [initiated.idempotency_key] * 2
    assert gateway.charges_made == 1
    assert len(of_type(uow_factory, *TERMINAL)) == 1


async def test_reconciling_a_finished_payment_does_nothing(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    gateway = ScriptedGateway()
    payment_id = await initiate(uow_factory, clock)
    await execute_payment(execute_cmd(payment_id), uow_factory, gateway, clock, POLICY)
    events = stream(uow_factory, payment_id)

    result = await reconcile_payment(
        ReconcilePayment(payment_id=payment_id), uow_factory, gateway, clock, POLICY
    )

    assert result is ExecuteResult.ALREADY_TERMINAL
    assert gateway.charge_calls == 1 and gateway.lookup_calls == 0
    assert stream(uow_factory, payment_id) == events


async def test_an_outcome_unknown_past_the_review_window_is_flagged_once_never_failed(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    # Every answer is lost and the gateway cannot look charges up: the outcome stays unknown.
    gateway = ScriptedGateway(*["lost"] * 10, supports_lookup=False)
    payment_id = await _unknown_payment(uow_factory, clock, gateway)
    reconcile = ReconcilePayment(payment_id=payment_id)

    clock.advance(POLICY.review_after_s - 1)
    early = await reconcile_payment(reconcile, uow_factory, gateway, clock, POLICY)
    clock.advance(1)
    due = await reconcile_payment(reconcile, uow_factory, gateway, clock, POLICY)
    clock.advance(POLICY.review_after_s)
    later = await reconcile_payment(reconcile, uow_factory, gateway, clock, POLICY)

    assert (early, due, later) == (
        ExecuteResult.UNKNOWN,
        ExecuteResult.FLAGGED,
        ExecuteResult.UNKNOWN,
    )
    events = stream(uow_factory, payment_id)
    assert sum(isinstance(e, PaymentFlaggedForReview) for e in events) == 1
    assert not any(isinstance(e, PaymentCompleted | PaymentFailed) for e in events)
    assert of_type(uow_factory, *TERMINAL) == []
    assert payment_of(uow_factory, "BK-1001").status is PaymentStatus.INITIATED
    assert len(set(gateway.keys_seen)) == 1


async def test_a_charge_still_in_progress_at_the_gateway_is_waited_for_not_charged_again(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    gateway = ScriptedGateway("lost")
    payment_id = await _unknown_payment(uow_factory, clock, gateway)
    gateway.lookup_in_progress = True
    reconcile = ReconcilePayment(payment_id=payment_id)
    before = stream(uow_factory, payment_id)
    clock.advance(5)

    result = await reconcile_payment(reconcile, uow_factory, gateway, clock, POLICY)

    assert result is ExecuteResult.UNKNOWN
    assert gateway.charge_calls == 1  # no new charge while one is in progress
    assert stream(uow_factory, payment_id) == before  # and nothing recorded meanwhile
    # ... but to the back of the reconciler's queue, so it cannot starve the others.
    assert uow_factory.db.status[payment_id] == (PaymentStatus.INITIATED, clock.now())
    assert of_type(uow_factory, *TERMINAL) == []

    clock.advance(POLICY.review_after_s)
    assert await reconcile_payment(reconcile, uow_factory, gateway, clock, POLICY) is (
        ExecuteResult.FLAGGED
    )
    assert gateway.charge_calls == 1

    gateway.lookup_in_progress = False  # the charge settled
    result = await reconcile_payment(reconcile, uow_factory, gateway, clock, POLICY)
    assert result is ExecuteResult.COMPLETED
    assert gateway.charge_calls == 1 and gateway.charges_made == 1


async def test_a_flagged_payment_is_still_resolved_when_the_gateway_answers(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    gateway = ScriptedGateway("lost", "lost", supports_lookup=False)
    payment_id = await _unknown_payment(uow_factory, clock, gateway)
    reconcile = ReconcilePayment(payment_id=payment_id)
    clock.advance(POLICY.review_after_s)
    assert await reconcile_payment(reconcile, uow_factory, gateway, clock, POLICY) is (
        ExecuteResult.FLAGGED
    )

    result = await reconcile_payment(reconcile, uow_factory, gateway, clock, POLICY)

    assert result is ExecuteResult.COMPLETED
    assert gateway.charges_made == 1
    assert len(of_type(uow_factory, "payment.completed")) == 1


async def test_a_gateway_outage_during_reconciliation_never_fails_an_unknown_payment(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    # The first charge went through but its answer was lost; then the gateway goes down.
    gateway = ScriptedGateway("lost", *["unavailable"] * 10, lookup_unavailable=True)
    payment_id = await _unknown_payment(uow_factory, clock, gateway)
    assert gateway.charges_made == 1

    result = await reconcile_payment(
        ReconcilePayment(payment_id=payment_id), uow_factory, gateway, clock, POLICY
    )

    assert result is ExecuteResult.UNKNOWN
    assert gateway.charge_calls == 1  # a lookup that fails is no licence to charge again
    assert of_type(uow_factory, *TERMINAL) == []
    assert payment_of(uow_factory, "BK-1001").status is PaymentStatus.INITIATED

    # The gateway comes back: the real outcome ends the payment, still with one charge.
    gateway.script.clear()
    gateway.lookup_unavailable = False
    resolved = await reconcile_payment(
        ReconcilePayment(payment_id=payment_id), uow_factory, gateway, clock, POLICY
    )

    assert resolved is ExecuteResult.COMPLETED
    assert gateway.charges_made == 1
    assert [m.type for m in of_type(uow_factory, *TERMINAL)] == ["payment.completed"]


async def test_another_execution_during_an_outage_never_fails_an_unknown_payment(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    gateway = ScriptedGateway("lost", *["unavailable"] * 10)
    payment_id = await _unknown_payment(uow_factory, clock, gateway)

    # A second instance handles the same payment under another message id. Its calls are
    # refused, so before failing it asks the gateway, which holds the lost charge.
    result = await execute_payment(
        execute_cmd(payment_id, message_id="elsewhere"), uow_factory, gateway, clock, POLICY
    )

    assert result is ExecuteResult.COMPLETED
    assert gateway.charges_made == 1
    assert [m.type for m in of_type(uow_factory, *TERMINAL)] == ["payment.completed"]


async def test_an_outage_after_an_unrecorded_charge_never_fails_the_payment(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    # The first execution wrote its ChargeStarted, charged and died before recording
    # anything (no ChargeAttempted); its lease has run out. The redelivered execution
    # finds the gateway refusing calls and lookups alike.
    gateway = ScriptedGateway(*["unavailable"] * 10)
    payment_id = await initiate(uow_factory, clock, "BK-2002")
    crashed = payment_of(uow_factory, "BK-2002")
    uow_factory.db.streams[payment_id] += crashed.start_charge(
        charger=uuid.uuid4(), at=clock.now(), lease_s=POLICY.charge_lease_s
    )
    gateway.ledger[crashed.idempotency_key] = Approved(
        provider_reference="pi_charged_before_the_crash"
    )
    gateway.lookup_unavailable = True
    clock.advance(POLICY.charge_lease_s)

    result = await execute_payment(execute_cmd(payment_id), uow_factory, gateway, clock, POLICY)

    assert result is ExecuteResult.UNKNOWN
    assert of_type(uow_factory, *TERMINAL) == []
    assert payment_of(uow_factory, "BK-2002").status is PaymentStatus.INITIATED


# Stripe forgets idempotency keys after 24 h; the policy looks up payments older than this.
KEY_LIFETIME_S = 23 * 3600.0
LATE_POLICY = msgspec.structs.replace(POLICY, key_lifetime_s=KEY_LIFETIME_S)


async def test_a_day_later_the_reconciler_never_charges_under_a_forgotten_key(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    # The first charge went through, its answer was lost; a day of outage later the
    # gateway has forgotten the key and its lookup fails once.
    gateway = ScriptedGateway("lost")
    payment_id = await _unknown_payment(uow_factory, clock, gateway)
    clock.advance(KEY_LIFETIME_S + 3600)
    gateway.forget_keys()
    gateway.lookup_unavailable = True

    result = await reconcile_payment(
        ReconcilePayment(payment_id=payment_id), uow_factory, gateway, clock, LATE_POLICY
    )

    assert result is ExecuteResult.FLAGGED  # unknown past the review window
    assert gateway.charges_made == 1
    assert of_type(uow_factory, *TERMINAL) == []

    gateway.lookup_unavailable = False
    resolved = await reconcile_payment(
        ReconcilePayment(payment_id=payment_id), uow_factory, gateway, clock, LATE_POLICY
    )
    assert resolved is ExecuteResult.COMPLETED
    assert gateway.charges_made == 1


async def test_a_late_execution_finds_the_charge_made_before_a_crash(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    # Charged, then the process died before recording anything; payment.initiated is
    # redelivered a day later, when the gateway no longer knows the key.
    gateway = ScriptedGateway()
    payment_id = await initiate(uow_factory, clock, "BK-2002")
    key = payment_of(uow_factory, "BK-2002").idempotency_key
    assert key is not None
    gateway.ledger[key] = Approved(provider_reference="pi_charged_before_the_crash")
    clock.advance(KEY_LIFETIME_S + 60)
    gateway.forget_keys()

    result = await execute_payment(
        execute_cmd(payment_id), uow_factory, gateway, clock, LATE_POLICY
    )

    assert result is ExecuteResult.COMPLETED
    assert gateway.charges_made == 1
    assert gateway.charge_calls == 0
    [completed] = of_type(uow_factory, "payment.completed")
    assert data(completed)["provider_reference"] == "pi_charged_before_the_crash"


async def test_a_late_execution_the_gateway_cannot_vouch_for_is_not_charged(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    gateway = ScriptedGateway(lookup_unavailable=True)
    payment_id = await initiate(uow_factory, clock, "BK-2003")
    clock.advance(KEY_LIFETIME_S + 60)

    result = await execute_payment(
        execute_cmd(payment_id), uow_factory, gateway, clock, LATE_POLICY
    )

    assert result is ExecuteResult.UNKNOWN
    assert gateway.charge_calls == 0
    assert of_type(uow_factory, *TERMINAL) == []
    assert payment_of(uow_factory, "BK-2003").status is PaymentStatus.INITIATED


@pytest.mark.parametrize("age_s", [0.0, KEY_LIFETIME_S + 60])
async def test_only_a_payment_older_than_the_key_lifetime_is_looked_up_before_its_charge(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock, age_s: float
) -> None:
    gateway = ScriptedGateway()
    payment_id = await initiate(uow_factory, clock, "BK-2004")
    clock.advance(age_s)

    result = await execute_payment(
        execute_cmd(payment_id), uow_factory, gateway, clock, LATE_POLICY
    )

    assert result is ExecuteResult.COMPLETED  # the gateway holds nothing: charged
    assert gateway.charges_made == 1
    assert gateway.lookup_calls == (1 if age_s else 0)


async def test_concurrent_reconciliations_record_one_outcome(
    uow_factory: MemoryUnitOfWorkFactory, clock: FakeClock
) -> None:
    gateway = ScriptedGateway("lost", supports_lookup=False)
    payment_id = await _unknown_payment(uow_factory, clock, gateway)

    results = await asyncio.gather(
        *(
            reconcile_payment(
                ReconcilePayment(payment_id=payment_id), uow_factory, gateway, clock, POLICY
            )
            for _ in range(20)
        )
    )

    assert results.count(ExecuteResult.COMPLETED) == 1
    assert gateway.charges_made == 1
    assert len(of_type(uow_factory, *TERMINAL)) == 1
