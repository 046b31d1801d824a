"""Integration messages of the external contract (CONTRACT.md section 3) and their builders."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Final, Literal, get_args

import msgspec

from payment.application.commands import TraceHeaders
from payment.application.validation import echo_safe
from payment.domain.events import (
    FailureReason,
    PaymentCompleted,
    PaymentEvent,
    PaymentFailed,
    PaymentRefunded,
    RefundFailed,
)
from payment.domain.ids import new_id
from payment.domain.payment import Payment

REQUEST_PAYMENT: Final = "saga.request_payment"
PAYMENT_INITIATED: Final = "payment.initiated"
PAYMENT_COMPLETED: Final = "payment.completed"
PAYMENT_FAILED: Final = "payment.failed"
REFUND_PAYMENT: Final = "saga.refund_payment"
PAYMENT_REFUNDED: Final = "payment.refunded"
PAYMENT_REFUND_FAILED: Final = "payment.refund_failed"

OutboundType = Literal[
    "payment.initiated",
    "payment.completed",
    "payment.failed",
    "payment.refunded",
    "payment.refund_failed",
]
# `payment.failed` reasons: the payment's own, or `cancelled` when a refund for the booking
# came first and closed it (contract 4.8; no payment exists then).
# (One Literal, not a union of two: the published schema is then one enum.)
PublishedFailureReason = Literal[
    "declined", "invalid_request", "processor_unavailable", "cancelled"
]
RefundFailedReason = Literal["not_charged", "over_refund", "declined", "invalid_request"]
PUBLISHED_FAILURE_REASONS: Final = get_args(PublishedFailureReason)
assert set(get_args(FailureReason)) < set(PUBLISHED_FAILURE_REASONS)
REFUND_FAILED_REASONS: Final = get_args(RefundFailedReason)

# The version of each outbound message's `data` shape written now. Published as the
# CloudEvents `dataschema` (`dataschema_uri`); an outbox row keeps the version it was
# written in, so a row queued by an earlier release is published under its own. A field
# added with a default keeps the version (consumers ignore unknown fields, contract 3);
# any other change bumps it, and docs/asyncapi.yaml keeps every version it ever had.
MESSAGE_VERSIONS: Final[dict[OutboundType, int]] = {
    PAYMENT_INITIATED: 1,
    PAYMENT_COMPLETED: 1,
    PAYMENT_FAILED: 1,
    PAYMENT_REFUNDED: 1,
    PAYMENT_REFUND_FAILED: 1,
}
DATASCHEMA_PREFIX: Final = "urn:payment-service:"


def dataschema_uri(kind: str, version: int) -> str:
    """The CloudEvents `dataschema` of a message type at a schema version."""
    return f"{DATASCHEMA_PREFIX}{kind}:{version}"


class RequestPaymentMessage(msgspec.Struct, frozen=True, kw_only=True):
    """`saga.request_payment` data.

    Decoding is strict about types (an amount of 1.5 or "100" does not decode) and
    tolerant of unknown fields. Only `booking_id` is needed to decode: a missing or
    out-of-range other field is a rule break answered with `invalid_request`.
    """

    booking_id: str
    amount: int | None = None
    currency: str | None = None
    payment_method: str | None = None
    customer_id: str | None = None
    saga_id: str | None = None


class PaymentInitiatedMessage(msgspec.Struct, frozen=True, kw_only=True):
    """`payment.initiated` data (no payment method: the executor reads it from the store)."""

    payment_id: str
    booking_id: str
    saga_id: str | None
    amount: int
    currency: str
    customer_id: str | None
    initiated_at: datetime
    version: int


class PaymentCompletedMessage(msgspec.Struct, frozen=True, kw_only=True):
    """`payment.completed` data."""

    payment_id: str
    booking_id: str
    saga_id: str | None
    amount: int
    currency: str
    processor: str
    provider_reference: str
    completed_at: datetime
    version: int


class PaymentFailedMessage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """`payment.failed` data; `payment_id` and `version` are absent when no payment exists."""

    booking_id: str
    saga_id: str | None
    reason: PublishedFailureReason
    detail: str
    failed_at: datetime
    payment_id: str | None = None
    version: int | None = None


class RefundPaymentMessage(msgspec.Struct, frozen=True, kw_only=True):
    """`saga.refund_payment` data: strict types, tolerant of unknown fields; only
    `booking_id` is needed to decode (a rule break is answered with `invalid_request`)."""

    booking_id: str
    amount: int | None = None
    reason: str | None = None
    saga_id: str | None = None


class PaymentRefundedMessage(msgspec.Struct, frozen=True, kw_only=True):
    """`payment.refunded` data: one refund, and the payment's refunded total after it."""

    payment_id: str
    booking_id: str
    saga_id: str | None
    refund_id: str
    amount: int
    refunded_total: int
    currency: str
    provider_reference: str
    refunded_at: datetime
    version: int


class PaymentRefundFailedMessage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """`payment.refund_failed` data; `payment_id` and `version` are absent when the booking
    has no payment, `refund_id` when no refund was created."""

    booking_id: str
    saga_id: str | None
    reason: RefundFailedReason
    detail: str
    failed_at: datetime
    payment_id: str | None = None
    refund_id: str | None = None
    version: int | None = None


class OutboundMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One message for the outbox: transport-neutral, fully determined when written.

    `event_id` becomes `ce_id` on every (re-)publication; `key` is the payment id (or the
    booking id when no payment exists); `sequence` is the event's stream version;
    `schema_version` the version of the shape `data` was written in (`ce_dataschema`).
    """

    event_id: uuid.UUID
    type: OutboundType
    key: str
    subject: str | None
    sequence: int | None
    time: datetime
    data: bytes
    trace: TraceHeaders = TraceHeaders()
    schema_version: int = 1


_encoder = msgspec.json.Encoder()


def _message(
    kind: OutboundType,
    data: msgspec.Struct,
    *,
    key: str,
    subject: str | None,
    at: datetime,
    trace: TraceHeaders,
    event: PaymentEvent | None = None,
) -> OutboundMessage:
    """The outbox row of `data`: announcing `event` of the payment's stream (its id and
    version), or a fresh id with no sequence when no event stands behind it."""
    return OutboundMessage(
        event_id=new_id() if event is None else event.event_id,
        type=kind,
        key=key,
        subject=subject,
        sequence=None if event is None else event.version,
        time=at,
        data=_encoder.encode(data),
        trace=trace,
        schema_version=MESSAGE_VERSIONS[kind],
    )


def _of_event(
    payment: Payment,
    kind: OutboundType,
    event: PaymentEvent,
    data: msgspec.Struct,
    trace: TraceHeaders,
) -> OutboundMessage:
    """A message announcing one event of the payment's stream, keyed by the payment."""
    key = str(payment.id)
    return _message(
        kind, data, key=key, subject=key, at=event.occurred_at, trace=trace, event=event
    )


def initiated_message(payment: Payment, trace: TraceHeaders) -> OutboundMessage:
    """`payment.initiated` for a freshly initiated payment."""
    event = payment.initiated
    data = PaymentInitiatedMessage(
        payment_id=str(payment.id),
        booking_id=payment.booking_id,
        saga_id=payment.saga_id,
        amount=payment.money.amount,
        currency=payment.money.currency,
        customer_id=payment.customer_id,
        initiated_at=event.occurred_at,
        version=event.version,
    )
    return _of_event(payment, PAYMENT_INITIATED, event, data, trace)


def outcome_message(payment: Payment, trace: TraceHeaders) -> OutboundMessage:
    """The terminal event of a payment as its contract message.

    A pure function of the stored events: a re-request re-publishes the same `event_id`
    and the same data. Raises `ValueError` for a payment still in flight.
    """
    match payment.outcome:
        case PaymentCompleted() as completed:
            data = PaymentCompletedMessage(
                payment_id=str(payment.id),
                booking_id=payment.booking_id,
                saga_id=payment.saga_id,
                amount=payment.money.amount,
                currency=payment.money.currency,
                processor=completed.processor,
                provider_reference=completed.provider_reference,
                completed_at=completed.occurred_at,
                version=completed.version,
            )
            return _of_event(payment, PAYMENT_COMPLETED, completed, data, trace)
        case PaymentFailed() as failed:
            failure = PaymentFailedMessage(
                payment_id=str(payment.id),
                booking_id=payment.booking_id,
                saga_id=payment.saga_id,
                reason=failed.reason,
                detail=failed.detail,
                failed_at=failed.occurred_at,
                version=failed.version,
            )
            return _of_event(payment, PAYMENT_FAILED, failed, failure, trace)
        case None:
            raise ValueError(f"payment {payment.id} is in flight: it has no outcome to announce")


def rejection_message(
    *,
    booking_id: str,
    saga_id: str | None,
    detail: str,
    at: datetime,
    trace: TraceHeaders,
) -> OutboundMessage:
    """`payment.failed` / `invalid_request` for a request that created no payment.

    The booking and saga ids are echoed for the orchestrator to correlate, but they come
    from a request that was refused: a card number in them is masked (contract 3: card
    data is never published) and a NUL replaced (the outbox could not store it); the
    Kafka key is the echoed booking id.
    """
    booking_id = echo_safe(booking_id)
    saga_id = None if saga_id is None else echo_safe(saga_id)
    return _no_payment_failed(booking_id, saga_id, "invalid_request", detail, at, trace)


def cancelled_message(
    *, booking_id: str, saga_id: str | None, at: datetime, trace: TraceHeaders
) -> OutboundMessage:
    """`payment.failed` / `cancelled`: a payment request for a booking a refund closed."""
    detail = "a refund for this booking arrived before its payment request: nothing charged"
    return _no_payment_failed(booking_id, saga_id, "cancelled", detail, at, trace)


def _no_payment_failed(
    booking_id: str,
    saga_id: str | None,
    reason: PublishedFailureReason,
    detail: str,
    at: datetime,
    trace: TraceHeaders,
) -> OutboundMessage:
    data = PaymentFailedMessage(
        booking_id=booking_id, saga_id=saga_id, reason=reason, detail=detail, failed_at=at
    )
    return _message(PAYMENT_FAILED, data, key=booking_id, subject=None, at=at, trace=trace)


def refunded_message(
    payment: Payment, event: PaymentRefunded, trace: TraceHeaders
) -> OutboundMessage:
    """`payment.refunded` for a refund just recorded (`payment` as of that event)."""
    refund = payment.refunds[event.refund_id]
    data = PaymentRefundedMessage(
        payment_id=str(payment.id),
        booking_id=payment.booking_id,
        saga_id=refund.requested.saga_id,
        refund_id=str(event.refund_id),
        amount=event.amount,
        refunded_total=payment.refunded_total,
        currency=payment.money.currency,
        provider_reference=event.provider_reference,
        refunded_at=event.occurred_at,
        version=event.version,
    )
    return _of_event(payment, PAYMENT_REFUNDED, event, data, trace)


def refund_failed_message(
    payment: Payment, event: RefundFailed, trace: TraceHeaders
) -> OutboundMessage:
    """`payment.refund_failed` for a refund that was requested and then failed."""
    refund = payment.refunds[event.refund_id]
    data = PaymentRefundFailedMessage(
        payment_id=str(payment.id),
        booking_id=payment.booking_id,
        saga_id=refund.requested.saga_id,
        refund_id=str(event.refund_id),
        reason=event.reason,
        detail=event.detail,
        failed_at=event.occurred_at,
        version=event.version,
    )
    return _of_event(payment, PAYMENT_REFUND_FAILED, event, data, trace)


def refund_refused_message(
    *,
    booking_id: str,
    saga_id: str | None,
    reason: RefundFailedReason,
    detail: str,
    at: datetime,
    trace: TraceHeaders,
    payment: Payment | None = None,
) -> OutboundMessage:
    """`payment.refund_failed` for a refund request that created no refund.

    Keyed by the payment id when the booking has a payment (its stream's order), by the
    echoed booking id otherwise; `version` is the payment's version when refused.
    """
    booking_id = echo_safe(booking_id)
    data = PaymentRefundFailedMessage(
        booking_id=booking_id,
        saga_id=None if saga_id is None else echo_safe(saga_id),
        reason=reason,
        detail=detail,
        failed_at=at,
        payment_id=None if payment is None else str(payment.id),
        version=None if payment is None else payment.version,
    )
    key = booking_id if payment is None else str(payment.id)
    subject = None if payment is None else key
    return _message(PAYMENT_REFUND_FAILED, data, key=key, subject=subject, at=at, trace=trace)
