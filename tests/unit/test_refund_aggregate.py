"""Refunds on the Payment aggregate, given / when / then: past events, a command, new events.

Partial and full refunds, over-refunds refused with nothing recorded, a refund waiting for
its charge's outcome, refunds of a failed payment, and replay giving back the same state.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from payment.domain.errors import IllegalTransition, NotCharged, OverRefund, RefundRefused
from payment.domain.events import (
    AnyPaymentEvent,
    PaymentCompleted,
    PaymentFailed,
    PaymentInitiated,
    PaymentRefunded,
    RefundFailed,
    RefundRequested,
)
from payment.domain.payment import Payment, PaymentStatus

PAYMENT_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LATER = T0 + timedelta(seconds=5)
CHARGED = 10_000
R1 = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
R2 = uuid.UUID("00000000-0000-4000-8000-0000000000b2")
R3 = uuid.UUID("00000000-0000-4000-8000-0000000000c3")


def _stamp(version: int) -> dict[str, Any]:
    return {
        "event_id": uuid.uuid4(),
        "payment_id": PAYMENT_ID,
        "version": version,
        "occurred_at": T0,
    }


def initiated() -> PaymentInitiated:
    return PaymentInitiated(
        **_stamp(1),
        booking_id="BK-1",
        saga_id="saga-1",
        amount=CHARGED,
        currency="EUR",
        customer_id=None,
        payment_method="pm_card_visa",
        idempotency_key=uuid.uuid4(),
    )


def completed(version: int = 2) -> PaymentCompleted:
    return PaymentCompleted(**_stamp(version), processor="fake", provider_reference="ch_1")


def failed(version: int = 2) -> PaymentFailed:
    return PaymentFailed(**_stamp(version), reason="declined", detail="declined")


def requested(version: int, refund_id: uuid.UUID, amount: int) -> RefundRequested:
    return RefundRequested(
        **_stamp(version),
        refund_id=refund_id,
        amount=amount,
        reason=None,
        saga_id="saga-1",
        idempotency_key=uuid.uuid4(),
    )


def refunded(version: int, refund_id: uuid.UUID, amount: int) -> PaymentRefunded:
    return PaymentRefunded(
        **_stamp(version),
        refund_id=refund_id,
        amount=amount,
        processor="fake",
        provider_reference=f"re_{version}",
    )


def refund_failed(version: int, refund_id: uuid.UUID) -> RefundFailed:
    return RefundFailed(**_stamp(version), refund_id=refund_id, reason="declined", detail="no")


def given(*events: AnyPaymentEvent) -> Payment:
    return Payment.replay(events)


def request(payment: Payment, amount: int | None, refund_id: uuid.UUID = R1) -> list[Any]:
    return payment.request_refund(
        refund_id=refund_id, amount=amount, reason="cancelled trip", saga_id="saga-1", at=LATER
    )


def assert_replays(payment: Payment, events: list[AnyPaymentEvent]) -> None:
    again = Payment.replay(events)
    assert (again.status, again.version, again.refunded_total, again.refundable) == (
        payment.status,
        payment.version,
        payment.refunded_total,
        payment.refundable,
    )
    assert again.refunds == payment.refunds


def test_a_partial_refund_is_requested_then_refunded_partially() -> None:
    history: list[AnyPaymentEvent] = [initiated(), completed()]
    payment = given(*history)
    (event,) = request(payment, 2_500)
    assert isinstance(event, RefundRequested)
    assert (event.version, event.refund_id, event.amount, event.reason) == (
        3,
        R1,
        2_500,
        "cancelled trip",
    )
    assert payment.status is PaymentStatus.COMPLETED
    assert payment.refundable == 7_500
    (done,) = payment.complete_refund(
        refund_id=R1, processor="fake", provider_reference="re_1", at=LATER
    )
    assert isinstance(done, PaymentRefunded) and done.amount == 2_500
    assert payment.status is PaymentStatus.PARTIALLY_REFUNDED
    assert payment.refunded_total == 2_500
    assert_replays(payment, [*history, event, done])


def test_partial_then_the_rest_refunds_fully() -> None:
    payment = given(initiated(), completed(), requested(3, R1, 4_000), refunded(4, R1, 4_000))
    (event,) = request(payment, None, R2)
    assert isinstance(event, RefundRequested) and event.amount == 6_000
    payment.complete_refund(refund_id=R2, processor="fake", provider_reference="re_2", at=LATER)
    assert payment.status is PaymentStatus.REFUNDED
    assert (payment.refunded_total, payment.refundable) == (CHARGED, 0)


def test_a_full_refund_without_an_amount() -> None:
    payment = given(initiated(), completed())
    (event,) = request(payment, None)
    assert isinstance(event, RefundRequested) and event.amount == CHARGED


@pytest.mark.parametrize("amount", [CHARGED + 1, 7_501])
def test_an_over_refund_is_refused_and_records_nothing(amount: int) -> None:
    payment = given(initiated(), completed(), requested(3, R1, 2_500))
    with pytest.raises(OverRefund):
        request(payment, amount, R2)
    assert payment.version == 3 and list(payment.refunds) == [R1]


def test_refunds_still_pending_count_against_the_charge() -> None:
    payment = given(initiated(), completed(), requested(3, R1, 6_000))
    with pytest.raises(OverRefund):
        request(payment, 5_000, R2)


def test_nothing_left_to_refund_is_an_over_refund() -> None:
    payment = given(initiated(), completed(), requested(3, R1, CHARGED), refunded(4, R1, CHARGED))
    with pytest.raises(OverRefund):
        request(payment, None, R2)
    with pytest.raises(OverRefund):
        request(payment, 1, R2)


def test_a_failed_refund_frees_its_amount_again() -> None:
    payment = given(initiated(), completed(), requested(3, R1, CHARGED), refund_failed(4, R1))
    assert payment.refundable == CHARGED
    assert payment.status is PaymentStatus.COMPLETED
    (event,) = request(payment, CHARGED, R2)
    assert isinstance(event, RefundRequested)


def test_a_refund_before_completion_waits_then_proceeds() -> None:
    payment = given(initiated())
    (event,) = request(payment, 3_000)
    assert isinstance(event, RefundRequested)
    assert payment.status is PaymentStatus.INITIATED
    assert [r.id for r in payment.pending_refunds] == [R1]
    with pytest.raises(IllegalTransition):  # no money went out yet
        payment.complete_refund(refund_id=R1, processor="fake", provider_reference="x", at=LATER)
    with pytest.raises(IllegalTransition):  # nor can the gateway have refused it
        payment.fail_refund(refund_id=R1, reason="declined", detail="x", at=LATER)
    payment.complete(processor="fake", provider_reference="ch_1", at=LATER)
    payment.complete_refund(refund_id=R1, processor="fake", provider_reference="re_1", at=LATER)
    assert payment.status is PaymentStatus.PARTIALLY_REFUNDED
    assert payment.pending_refunds == []


def test_a_refund_waiting_for_a_charge_that_fails_is_not_charged() -> None:
    payment = given(initiated(), requested(2, R1, 3_000), failed(3))
    (event,) = payment.fail_refund(
        refund_id=R1, reason="not_charged", detail="the payment failed", at=LATER
    )
    assert isinstance(event, RefundFailed) and event.reason == "not_charged"
    assert payment.pending_refunds == []
    assert payment.status is PaymentStatus.FAILED


def test_not_charged_is_refused_for_a_charged_payment() -> None:
    payment = given(initiated(), completed(), requested(3, R1, 3_000))
    with pytest.raises(IllegalTransition):
        payment.fail_refund(refund_id=R1, reason="not_charged", detail="x", at=LATER)


def test_a_refund_of_a_failed_payment_is_refused_as_not_charged() -> None:
    payment = given(initiated(), failed())
    with pytest.raises(NotCharged) as refused:
        request(payment, 100)
    assert refused.value.reason == "not_charged"
    assert payment.version == 2 and payment.refunds == {}


def test_a_refund_id_is_used_once_and_amounts_are_positive() -> None:
    payment = given(initiated(), completed(), requested(3, R1, 100))
    with pytest.raises(RefundRefused):
        request(payment, 100, R1)
    with pytest.raises(RefundRefused) as refused:
        request(payment, 0, R2)
    assert refused.value.reason == "invalid_request"


def test_a_settled_refund_is_settled_once() -> None:
    payment = given(initiated(), completed(), requested(3, R1, 100), refunded(4, R1, 100))
    with pytest.raises(IllegalTransition):
        payment.complete_refund(refund_id=R1, processor="fake", provider_reference="x", at=LATER)
    with pytest.raises(IllegalTransition):
        payment.fail_refund(refund_id=R3, reason="declined", detail="x", at=LATER)


def test_a_refunded_payment_is_still_terminal_for_charges() -> None:
    payment = given(initiated(), completed(), requested(3, R1, CHARGED), refunded(4, R1, CHARGED))
    assert payment.is_terminal
    with pytest.raises(IllegalTransition):
        payment.complete(processor="fake", provider_reference="x", at=LATER)
    assert isinstance(payment.outcome, PaymentCompleted)


def test_ten_refunds_of_a_tenth_then_nothing_more() -> None:
    payment = given(initiated(), completed())
    accepted = 0
    for _ in range(15):
        try:
            request(payment, CHARGED // 10, uuid.uuid4())
            accepted += 1
        except OverRefund:
            pass
    assert accepted == 10 and payment.refundable == 0


# -- any sequence of refund commands ------------------------------------------------------


class RefundMachine(RuleBasedStateMachine):
    """Whatever refunds, outcomes and charge outcome come, in any order: the refunded total
    never exceeds the charge, refunds not failed never exceed it either, a refused command
    records nothing, and replaying the events rebuilds the same state."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[AnyPaymentEvent] = [initiated()]
        self.payment = Payment.replay(self.events)

    def _do(self, command: Any) -> None:
        before = self.payment.version
        try:
            self.events += command(self.payment)
        except (IllegalTransition, RefundRefused):
            assert self.payment.version == before  # refused: nothing recorded

    @rule(amount=st.one_of(st.none(), st.integers(min_value=-5, max_value=CHARGED + 5)))
    def request(self, amount: int | None) -> None:
        self._do(lambda p: request(p, amount, uuid.uuid4()))

    @rule(index=st.integers(min_value=0, max_value=20), refunded=st.booleans())
    def settle(self, index: int, refunded: bool) -> None:
        ids = list(self.payment.refunds)
        if not ids:
            return
        refund_id = ids[index % len(ids)]
        if refunded:
            self._do(
                lambda p: p.complete_refund(
                    refund_id=refund_id, processor="fake", provider_reference="re", at=LATER
                )
            )
        else:
            reason = "not_charged" if p_failed(self.payment) else "declined"
            self._do(
                lambda p: p.fail_refund(refund_id=refund_id, reason=reason, detail="x", at=LATER)
            )

    @rule(charged=st.booleans())
    def charge_outcome(self, charged: bool) -> None:
        if charged:
            self._do(lambda p: p.complete(processor="fake", provider_reference="ch", at=LATER))
        else:
            self._do(lambda p: p.fail(reason="declined", detail="no", at=LATER))

    @invariant()
    def never_past_the_charge(self) -> None:
        p = self.payment
        assert 0 <= p.refunded_total <= CHARGED
        assert 0 <= p.refundable <= CHARGED
        assert p.refunded_total + sum(r.amount for r in p.pending_refunds) <= CHARGED
        if p.status is PaymentStatus.REFUNDED:
            assert p.refunded_total == CHARGED
        if p.status is PaymentStatus.FAILED:
            assert p.refunded_total == 0

    @invariant()
    def replays_to_the_same_state(self) -> None:
        assert_replays(self.payment, self.events)


def p_failed(payment: Payment) -> bool:
    return payment.status is PaymentStatus.FAILED


TestRefundMachine = RefundMachine.TestCase
