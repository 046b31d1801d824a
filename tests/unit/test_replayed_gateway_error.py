"""A gateway error replayed under the payment's idempotency key is detected and flagged at once."""

from __future__ import annotations

import uuid

import pytest
import stripe
from test_handlers import POLICY, FakeClock, execute_cmd, initiate, kinds, stream

from payment.adapters.memory import MemoryUnitOfWorkFactory
from payment.adapters.processors.stripe import StripeProcessor
from payment.application.commands import ReconcilePayment
from payment.application.handlers import ExecuteResult, execute_payment, reconcile_payment
from payment.domain.money import Money
from payment.domain.processor import (
    ChargeOutcome,
    ChargeRequest,
    GatewayErrorReplayed,
    OutcomeUnknown,
)


class ReplayingGateway:
    """Every charge under a key gets the 500 its first request got; search finds nothing."""

    name = "replaying"

    def __init__(self) -> None:
        self.charges = 0

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        self.charges += 1
        if self.charges == 1:
            raise OutcomeUnknown("stripe: no usable answer (APIError, HTTP 500)")
        raise GatewayErrorReplayed("stripe: replays the stored error of this idempotency key")

    async def lookup(self, request: ChargeRequest) -> ChargeOutcome | None:
        return None


async def test_the_replayed_error_flags_the_payment_once_and_never_fails_it() -> None:
    uows, clock, gateway = MemoryUnitOfWorkFactory(), FakeClock(), ReplayingGateway()
    payment_id = await initiate(uows, clock)
    assert await execute_payment(execute_cmd(payment_id), uows, gateway, clock, POLICY) is (
        ExecuteResult.UNKNOWN
    )
    clock.advance(120)
    reconcile = ReconcilePayment(payment_id=payment_id)

    first = await reconcile_payment(reconcile, uows, gateway, clock, POLICY)
    clock.advance(120)
    second = await reconcile_payment(reconcile, uows, gateway, clock, POLICY)

    assert (first, second) == (ExecuteResult.FLAGGED, ExecuteResult.UNKNOWN)
    events = kinds(stream(uows, payment_id))
    assert events.count("PaymentFlaggedForReview") == 1  # long before the review window
    assert "PaymentFailed" not in events and "PaymentCompleted" not in events


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Idempotent-Replayed": "true"}, GatewayErrorReplayed),
        ({}, OutcomeUnknown),
    ],
)
def test_stripe_tells_a_replayed_500_from_a_fresh_one(
    headers: dict[str, str], expected: type[Exception]
) -> None:
    processor = StripeProcessor("sk_test_x", name="sandbox", api_base="http://127.0.0.1:9")
    error = stripe.APIError("boom", http_status=500, headers=headers)
    request = ChargeRequest(
        payment_id=uuid.uuid4(),
        booking_id="b",
        money=Money(amount=100, currency="EUR"),
        payment_method="pm_card_visa",
        idempotency_key=uuid.uuid4(),
    )

    with pytest.raises(OutcomeUnknown) as raised:
        processor._outcome_of_error(request, error)

    assert type(raised.value) is expected
