"""Events and outbox messages for tests that store them: fixed times, fresh ids."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from payment.application.commands import TraceHeaders
from payment.application.messages import OutboundMessage, OutboundType
from payment.domain.events import (
    AnyPaymentEvent,
    ChargeAttempted,
    PaymentCompleted,
    PaymentFailed,
    PaymentFlaggedForReview,
    PaymentInitiated,
)

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def initiated(stream: uuid.UUID, *, booking_id: str = "booking-1") -> PaymentInitiated:
    return PaymentInitiated(
        event_id=uuid.uuid4(),
        payment_id=stream,
        version=1,
        occurred_at=T0,
        booking_id=booking_id,
        saga_id="saga-1",
        amount=1250,
        currency="EUR",
        customer_id=None,
        payment_method="pm_card_visa",
        idempotency_key=uuid.uuid4(),
    )


def attempted(stream: uuid.UUID, version: int) -> ChargeAttempted:
    return ChargeAttempted(
        event_id=uuid.uuid4(),
        payment_id=stream,
        version=version,
        occurred_at=at(version),
        attempt=version - 1,
        processor="fake",
        result="unknown",
        detail="charge: OutcomeUnknown: no answer",
    )


def every_event_type(stream: uuid.UUID) -> list[AnyPaymentEvent]:
    """One event of each type, versions 1..5 (a stream no aggregate would write; the store
    does not care)."""
    return [
        initiated(stream),
        attempted(stream, 2),
        PaymentFlaggedForReview(
            event_id=uuid.uuid4(),
            payment_id=stream,
            version=3,
            occurred_at=at(3.000123),
            detail="outcome unknown for 3600s: needs manual review",
        ),
        PaymentFailed(
            event_id=uuid.uuid4(),
            payment_id=stream,
            version=4,
            occurred_at=at(4),
            reason="declined",
            detail="payment declined by the processor (card_declined)",
            decline_code="card_declined",
        ),
        PaymentCompleted(
            event_id=uuid.uuid4(),
            payment_id=stream,
            version=5,
            occurred_at=at(5),
            processor="fake",
            provider_reference="fake_0123456789abcdef01234567",
        ),
    ]


def message(
    key: str,
    *,
    sequence: int | None = 1,
    kind: OutboundType = "payment.initiated",
    event_id: uuid.UUID | None = None,
    trace: TraceHeaders | None = None,
) -> OutboundMessage:
    return OutboundMessage(
        event_id=event_id or uuid.uuid4(),
        type=kind,
        key=key,
        subject=key if sequence is not None else None,
        sequence=sequence,
        time=at(sequence or 0),
        data=b'{"payment_id":"%s","version":%d}' % (key.encode(), sequence or 0),
        trace=trace or TraceHeaders(),
    )
