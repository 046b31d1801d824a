"""A payment just initiated, for tests of what follows: only what a test cares about is
given, the rest takes plain defaults."""

from __future__ import annotations

import uuid
from datetime import datetime

from payment.domain.events import AnyPaymentEvent
from payment.domain.money import Money
from payment.domain.payment import Payment
from support.clock import START


def initiate_payment(
    *,
    amount: int = 100,
    currency: str = "EUR",
    booking_id: str = "BK-1",
    saga_id: str | None = None,
    customer_id: str | None = None,
    payment_method: str = "pm_card_visa",
    payment_id: uuid.UUID | None = None,
    at: datetime = START,
) -> tuple[Payment, list[AnyPaymentEvent]]:
    """`Payment.initiate` with these fields: the payment and its PaymentInitiated."""
    return Payment.initiate(
        payment_id=payment_id or uuid.uuid4(),
        booking_id=booking_id,
        money=Money.of(amount, currency),
        payment_method=payment_method,
        saga_id=saga_id,
        customer_id=customer_id,
        at=at,
    )
