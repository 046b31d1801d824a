"""The Payment aggregate in given / when / then form: past events, a command, new events.

Every legal transition, every illegal one (IllegalTransition, nothing recorded), stream
mismatches, and a Hypothesis state machine showing that whatever the aggregate accepts
replays from its events to the same state and version.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

import msgspec
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from payment.adapters.memory import MemoryUnitOfWorkFactory
from payment.application.errors import ConcurrencyConflict
from payment.domain.errors import IllegalTransition, StreamMismatch
from payment.domain.events import (
    AnyPaymentEvent,
    AttemptResult,
    ChargeAttempted,
    FailureReason,
    PaymentCompleted,
    PaymentFailed,
    PaymentFlaggedForReview,
    PaymentInitiated,
    decode_event,
    encode_event,
)
from payment.domain.money import Money
from payment.domain.payment import Payment, PaymentStatus
from support.payments import initiate_payment

PAYMENT_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
IDEMPOTENCY_KEY = uuid.UUID("00000000-0000-4000-8000-0000000000aa")
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LATER = T0 + timedelta(seconds=5)
# Stands in for the fresh random event id of every new event when comparing.
ANY_ID = uuid.UUID(int=0)

Command = Callable[[Payment], list[AnyPaymentEvent]]


# -- past events -------------------------------------------------------------------------


def _stamp(version: int, at: datetime = T0) -> dict[str, Any]:
    return {
        "event_id": uuid.uuid4(),
        "payment_id": PAYMENT_ID,
        "version": version,
        "occurred_at": at,
    }


def initiated() -> PaymentInitiated:
    return PaymentInitiated(
        **_stamp(1),
        booking_id="BK-1001",
        saga_id="saga-7",
        amount=12_500,
        currency="EUR",
        customer_id="cus_42",
        payment_method="pm_card_visa",
        idempotency_key=IDEMPOTENCY_KEY,
    )


def attempted(version: int, result: AttemptResult = "unknown", attempt: int = 1) -> ChargeAttempted:
    return ChargeAttempted(
        **_stamp(version), attempt=attempt, processor="fake", result=result, detail="charge"
    )


def completed(version: int) -> PaymentCompleted:
    return PaymentCompleted(**_stamp(version), processor="fake", provider_reference="ch_1")


def failed(version: int, reason: FailureReason = "declined") -> PaymentFailed:
    return PaymentFailed(**_stamp(version), reason=reason, detail="declined", decline_code="x")


def flagged(version: int) -> PaymentFlaggedForReview:
    return PaymentFlaggedForReview(**_stamp(version), detail="needs a human")


# -- commands ----------------------------------------------------------------------------


def record_attempt(result: AttemptResult = "approved") -> Command:
    return lambda p: p.record_attempt(processor="fake", result=result, detail="charge", at=LATER)


def complete() -> Command:
    return lambda p: p.complete(processor="fake", provider_reference="ch_9", at=LATER)


def fail(reason: FailureReason = "declined", decline_code: str | None = None) -> Command:
    return lambda p: p.fail(reason=reason, detail="no", at=LATER, decline_code=decline_code)


def flag_for_review() -> Command:
    return lambda p: p.flag_for_review(detail="unknown for 1h", at=LATER)


EVERY_COMMAND: dict[str, Command] = {
    "record_attempt": record_attempt(),
    "complete": complete(),
    "fail": fail(),
    "flag_for_review": flag_for_review(),
}


# -- the given / when / then harness --------------------------------------------------------


def state(payment: Payment) -> dict[str, Any]:
    """Everything the aggregate knows (but the events it has yet to hand to the unit of
    work); its fields are immutable values, so a copy suffices."""
    return {k: v for k, v in vars(payment).items() if k != "_unsaved"}


def without_id(event: AnyPaymentEvent) -> AnyPaymentEvent:
    return msgspec.structs.replace(event, event_id=ANY_ID)


class Given:
    def __init__(self, history: Sequence[AnyPaymentEvent]) -> None:
        self.history = list(history)
        self.payment = Payment.replay(self.history)

    def when(self, command: Command) -> When:
        return When(self, command)


class When:
    def __init__(self, given: Given, command: Command) -> None:
        self.given = given
        self.command = command

    def then(self, *expected: AnyPaymentEvent) -> Payment:
        """The command emits exactly `expected` (event ids aside) and replay agrees."""
        payment = self.given.payment
        new = self.command(payment)

        assert [without_id(e) for e in new] == [without_id(e) for e in expected]
        known_ids = {e.event_id for e in self.given.history}
        assert all(e.event_id not in known_ids for e in new), "event ids must be fresh"
        assert payment.version == len(self.given.history) + len(new)
        assert state(Payment.replay([*self.given.history, *new])) == state(payment)
        return payment

    def then_illegal(self) -> None:
        """The command raises IllegalTransition and records nothing."""
        payment = self.given.payment
        before = state(payment)

        with pytest.raises(IllegalTransition):
            self.command(payment)

        assert state(payment) == before


def given(*history: AnyPaymentEvent) -> Given:
    return Given(history)


def expect(event_type: type[Any], version: int, **fields: Any) -> Any:
    return event_type(
        event_id=ANY_ID, payment_id=PAYMENT_ID, version=version, occurred_at=LATER, **fields
    )


# -- initiate --------------------------------------------------------------------------------


def test_initiate_gives_a_payment_initiated_at_version_1() -> None:
    payment, events = Payment.initiate(
        payment_id=PAYMENT_ID,
        booking_id="BK-1001",
        money=Money.of(12_500, "EUR"),
        payment_method="pm_card_visa",
        saga_id="saga-7",
        customer_id="cus_42",
        at=T0,
        idempotency_key=IDEMPOTENCY_KEY,
    )

    assert [without_id(e) for e in events] == [without_id(initiated())]
    assert payment.status is PaymentStatus.INITIATED
    assert payment.version == 1
    assert payment.money == Money(amount=12_500, currency="EUR")
    assert payment.initiated == events[0]
    assert payment.outcome is None and not payment.is_terminal
    assert state(Payment.replay(events)) == state(payment)


def test_initiate_draws_a_fresh_idempotency_key_that_replay_keeps() -> None:
    def new() -> Payment:
        payment, _ = initiate_payment(amount=1, payment_method="tok", at=T0)
        return payment

    first, second = new(), new()

    assert first.idempotency_key.version == 4  # drawn at random
    assert first.idempotency_key != second.idempotency_key
    assert first.initiated.idempotency_key == first.idempotency_key
    assert Payment.replay([first.initiated]).idempotency_key == first.idempotency_key


# -- legal transitions ----------------------------------------------------------------------


@pytest.mark.parametrize("result", get_args(AttemptResult))
def test_an_initiated_payment_records_a_charge_attempt(result: AttemptResult) -> None:
    payment = (
        given(initiated())
        .when(record_attempt(result))
        .then(
            expect(ChargeAttempted, 2, attempt=1, processor="fake", result=result, detail="charge")
        )
    )

    assert payment.status is PaymentStatus.INITIATED
    assert payment.attempts == 1


def test_attempts_are_numbered_in_order() -> None:
    payment = (
        given(initiated(), attempted(2, "unavailable", 1), attempted(3, "unknown", 2))
        .when(record_attempt("approved"))
        .then(
            expect(
                ChargeAttempted, 4, attempt=3, processor="fake", result="approved", detail="charge"
            )
        )
    )

    assert payment.attempts == 3


@pytest.mark.parametrize(
    "history",
    [
        pytest.param([initiated()], id="initiated"),
        pytest.param([initiated(), attempted(2)], id="after-an-attempt"),
        pytest.param([initiated(), attempted(2), flagged(3)], id="flagged"),
    ],
)
def test_an_in_flight_payment_completes(history: list[AnyPaymentEvent]) -> None:
    version = len(history) + 1
    payment = (
        given(*history)
        .when(complete())
        .then(expect(PaymentCompleted, version, processor="fake", provider_reference="ch_9"))
    )

    assert payment.status is PaymentStatus.COMPLETED
    assert payment.is_terminal
    assert isinstance(payment.outcome, PaymentCompleted)


@pytest.mark.parametrize("reason", get_args(FailureReason))
@pytest.mark.parametrize(
    "history",
    [
        pytest.param([initiated()], id="initiated"),
        pytest.param([initiated(), attempted(2, "declined")], id="after-an-attempt"),
        pytest.param([initiated(), flagged(2)], id="flagged"),
    ],
)
def test_an_in_flight_payment_fails(history: list[AnyPaymentEvent], reason: FailureReason) -> None:
    version = len(history) + 1
    payment = (
        given(*history)
        .when(fail(reason, decline_code="card_declined"))
        .then(
            expect(PaymentFailed, version, reason=reason, detail="no", decline_code="card_declined")
        )
    )

    assert payment.status is PaymentStatus.FAILED
    assert payment.is_terminal
    assert isinstance(payment.outcome, PaymentFailed)


def test_a_failure_without_a_decline_code_records_none() -> None:
    given(initiated()).when(fail("processor_unavailable")).then(
        expect(PaymentFailed, 2, reason="processor_unavailable", detail="no", decline_code=None)
    )


def test_an_in_flight_payment_is_flagged_for_review_and_stays_in_flight() -> None:
    payment = (
        given(initiated(), attempted(2, "unknown"))
        .when(flag_for_review())
        .then(expect(PaymentFlaggedForReview, 3, detail="unknown for 1h"))
    )

    assert payment.flagged_for_review
    assert payment.status is PaymentStatus.INITIATED
    assert not payment.is_terminal


def test_a_flagged_payment_still_records_attempts() -> None:
    given(initiated(), flagged(2)).when(record_attempt("unknown")).then(
        expect(ChargeAttempted, 3, attempt=1, processor="fake", result="unknown", detail="charge")
    )


# -- illegal transitions ---------------------------------------------------------------------


# (A payment not initiated cannot take a command: there is none, as a Payment exists only
# from its PaymentInitiated on; see the stream-mismatch tests below.)
ENDED = {
    "completed": [initiated(), completed(2)],
    "failed": [initiated(), failed(2)],
    "completed-after-attempts": [initiated(), attempted(2, "approved"), completed(3)],
    "failed-after-review": [initiated(), attempted(2), flagged(3), failed(4, "declined")],
}


@pytest.mark.parametrize("command", EVERY_COMMAND.values(), ids=EVERY_COMMAND.keys())
@pytest.mark.parametrize("history", ENDED.values(), ids=ENDED.keys())
def test_a_payment_not_in_flight_accepts_no_command(
    history: list[AnyPaymentEvent], command: Command
) -> None:
    given(*history).when(command).then_illegal()


def test_a_payment_is_flagged_for_review_once_only() -> None:
    given(initiated(), flagged(2)).when(flag_for_review()).then_illegal()


@pytest.mark.parametrize("earlier", ["unknown", "approved"])
def test_a_payment_that_may_have_been_charged_cannot_fail_as_unavailable(
    earlier: AttemptResult,
) -> None:
    given(initiated(), attempted(2, earlier), attempted(3, "unavailable", 2)).when(
        fail("processor_unavailable")
    ).then_illegal()


@pytest.mark.parametrize("earlier", ["unavailable", "declined"])
def test_a_payment_never_charged_may_fail_as_unavailable(earlier: AttemptResult) -> None:
    given(initiated(), attempted(2, earlier)).when(fail("processor_unavailable")).then(
        expect(PaymentFailed, 3, reason="processor_unavailable", detail="no", decline_code=None)
    )


def test_a_payment_that_may_have_been_charged_still_ends_with_the_gateways_answer() -> None:
    given(initiated(), attempted(2, "unknown")).when(fail("declined", "do_not_honor")).then(
        expect(PaymentFailed, 3, reason="declined", detail="no", decline_code="do_not_honor")
    )


def test_an_illegal_transition_message_carries_no_payment_data() -> None:
    payment = given(initiated(), completed(2)).payment

    with pytest.raises(IllegalTransition) as caught:
        payment.fail(reason="declined", detail="secret-detail", at=LATER)

    assert "pm_card_visa" not in str(caught.value)
    assert "secret-detail" not in str(caught.value)


# -- stream mismatches -----------------------------------------------------------------------


def test_replaying_an_empty_stream_is_a_mismatch() -> None:
    with pytest.raises(StreamMismatch):
        Payment.replay([])


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(
            msgspec.structs.replace(completed(2), payment_id=uuid.uuid4()), id="other-stream"
        ),
        pytest.param(completed(3), id="version-gap"),
        pytest.param(completed(1), id="version-repeated"),
        pytest.param(completed(0), id="version-zero"),
    ],
)
def test_an_event_of_another_stream_or_out_of_order_is_a_mismatch_and_changes_nothing(
    event: AnyPaymentEvent,
) -> None:
    payment = given(initiated()).payment
    before = state(payment)

    with pytest.raises(StreamMismatch):
        payment.apply(event)

    assert state(payment) == before


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param([attempted(2), initiated()], id="out-of-order"),
        pytest.param([initiated(), attempted(2), attempted(2)], id="duplicate-version"),
        pytest.param([initiated(), completed(3)], id="gap"),
        pytest.param([attempted(2)], id="starts-past-version-1"),
    ],
)
def test_replaying_a_broken_stream_is_a_mismatch(stream: list[AnyPaymentEvent]) -> None:
    with pytest.raises(StreamMismatch):
        Payment.replay(stream)


def test_a_payment_starts_with_a_payment_initiated_at_version_1_and_only_there() -> None:
    with pytest.raises(StreamMismatch):
        Payment(msgspec.structs.replace(initiated(), version=2))
    with pytest.raises(StreamMismatch):
        given(initiated()).payment.apply(msgspec.structs.replace(initiated(), version=2))


def new_payment(currency: str) -> tuple[Payment, list[AnyPaymentEvent]]:
    """A payment of 700 in `currency`, just initiated, and its PaymentInitiated."""
    return initiate_payment(
        payment_id=PAYMENT_ID,
        booking_id="BK-9",
        amount=700,
        currency=currency,
        payment_method="tok",
        at=T0,
    )


# -- pending events: decided once, handed to the unit of work once ---------------------------


def test_the_events_a_payment_decides_are_collected_once_in_order() -> None:
    payment, history = new_payment("JPY")
    history += payment.record_attempt(processor="fake", result="unknown", detail="lost", at=T0)

    assert list(payment.collect_events()) == history
    assert list(payment.collect_events()) == []
    later = payment.flag_for_review(detail="1h", at=LATER)
    assert list(payment.collect_events()) == later


def test_a_replayed_payment_has_nothing_to_save_and_a_refused_command_adds_nothing() -> None:
    payment = given(initiated(), completed(2)).payment

    assert list(payment.collect_events()) == []
    with pytest.raises(IllegalTransition):
        payment.complete(processor="fake", provider_reference="ch_2", at=LATER)
    assert list(payment.collect_events()) == []


async def test_the_unit_of_work_saves_what_a_payment_decided_after_the_version_it_loaded() -> None:
    factory = MemoryUnitOfWorkFactory()
    async with factory() as uow:
        payment, created = new_payment("EUR")
        await uow.save(payment)
        await uow.commit()
    async with factory() as uow:
        first = await uow.load(PAYMENT_ID)
        decided = first.record_attempt(processor="fake", result="approved", detail="ok", at=T0)
        decided += first.complete(processor="fake", provider_reference="ch_1", at=T0)
        await uow.save(first)
        await uow.commit()
    async with factory() as uow:
        stale = Payment.replay(created)  # loaded before the save above
        stale.fail(reason="declined", detail="no", at=LATER)
        with pytest.raises(ConcurrencyConflict):
            await uow.save(stale)

    assert factory.db.streams[PAYMENT_ID] == [*created, *decided]


# -- replay ----------------------------------------------------------------------------------


def test_replay_of_stored_events_rebuilds_what_the_commands_left() -> None:
    payment, history = new_payment("JPY")
    history += payment.record_attempt(processor="fake", result="unknown", detail="lost", at=T0)
    history += payment.flag_for_review(detail="1h", at=LATER)
    history += payment.record_attempt(processor="fake", result="declined", detail="d", at=LATER)
    history += payment.fail(reason="declined", detail="d", at=LATER, decline_code="do_not_honor")

    stored = [decode_event(encode_event(e)) for e in history]
    rebuilt = Payment.replay(stored)

    assert stored == history
    assert [e.version for e in stored] == [1, 2, 3, 4, 5]
    assert state(rebuilt) == state(payment)
    assert rebuilt.status is PaymentStatus.FAILED
    assert rebuilt.attempts == 2 and rebuilt.flagged_for_review


# -- property: whatever the aggregate accepts replays; whatever it rejects leaves nothing ----------


_datetimes = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)
)
_text = st.text(max_size=20)


class PaymentLifecycle(RuleBasedStateMachine):
    """Random command sequences against one payment, checked against replay of its events."""

    def __init__(self) -> None:
        super().__init__()
        self.payment = Payment(initiated())  # replaced by `initiate`, which runs first
        self.events: list[AnyPaymentEvent] = []
        self.rejected = 0

    @initialize(
        amount=st.integers(min_value=1, max_value=100_000_000),
        currency=st.sampled_from(["EUR", "JPY", "KWD"]),
        saga_id=st.none() | _text,
        customer_id=st.none() | _text,
        at=_datetimes,
    )
    def initiate(
        self, amount: int, currency: str, saga_id: str | None, customer_id: str | None, at: datetime
    ) -> None:
        self.payment, self.events = initiate_payment(
            payment_id=PAYMENT_ID,
            amount=amount,
            currency=currency,
            payment_method="tok",
            saga_id=saga_id,
            customer_id=customer_id,
            at=at,
        )

    def _decide(self, command: Command) -> None:
        before = state(self.payment)
        try:
            new = command(self.payment)
        except IllegalTransition:
            self.rejected += 1
            assert state(self.payment) == before, "a rejected command changed the state"
            return
        assert before["status"] is PaymentStatus.INITIATED, "accepted a command while not in flight"
        assert [e.version for e in new] == [before["version"] + 1]
        self.events += new

    @rule(result=st.sampled_from(get_args(AttemptResult)), detail=_text, at=_datetimes)
    def record_attempt(self, result: AttemptResult, detail: str, at: datetime) -> None:
        self._decide(
            lambda p: p.record_attempt(processor="fake", result=result, detail=detail, at=at)
        )

    @rule(reference=_text, at=_datetimes)
    def complete(self, reference: str, at: datetime) -> None:
        self._decide(lambda p: p.complete(processor="fake", provider_reference=reference, at=at))

    @rule(
        reason=st.sampled_from(get_args(FailureReason)),
        code=st.none() | _text,
        at=_datetimes,
    )
    def fail(self, reason: FailureReason, code: str | None, at: datetime) -> None:
        self._decide(lambda p: p.fail(reason=reason, detail="d", at=at, decline_code=code))

    @rule(at=_datetimes)
    def flag_for_review(self, at: datetime) -> None:
        self._decide(lambda p: p.flag_for_review(detail="review", at=at))

    @precondition(lambda self: self.events)
    @invariant()
    def replay_rebuilds_the_same_state_and_version(self) -> None:
        assert state(Payment.replay(self.events)) == state(self.payment)
        stored = [decode_event(encode_event(e)) for e in self.events]
        assert state(Payment.replay(stored)) == state(self.payment)
        assert self.payment.version == len(self.events)

    @invariant()
    def the_stream_ends_at_its_first_outcome(self) -> None:
        outcomes = [
            i for i, e in enumerate(self.events) if isinstance(e, PaymentCompleted | PaymentFailed)
        ]
        assert outcomes in ([], [len(self.events) - 1])
        assert sum(isinstance(e, PaymentFlaggedForReview) for e in self.events) <= 1

    @invariant()
    def a_charge_that_may_have_happened_is_never_failed_as_unavailable(self) -> None:
        maybe_charged = False
        for event in self.events:
            if isinstance(event, ChargeAttempted) and event.result in ("unknown", "approved"):
                maybe_charged = True
            if isinstance(event, PaymentFailed) and event.reason == "processor_unavailable":
                assert not maybe_charged


TestPaymentLifecycle = PaymentLifecycle.TestCase
