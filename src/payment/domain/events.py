"""Events of the Payment stream: past-tense facts stamped with stream, version and time."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

import msgspec

FailureReason = Literal["declined", "invalid_request", "processor_unavailable"]
AttemptResult = Literal["approved", "declined", "unavailable", "unknown"]
# Why a refund that was requested ended without money going back (contract 3).
RefundFailureReason = Literal["not_charged", "declined", "invalid_request"]


class PaymentEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Common envelope of every stored event (stream id, version, when it happened)."""

    event_id: uuid.UUID
    payment_id: uuid.UUID
    version: int
    occurred_at: datetime


class PaymentInitiated(PaymentEvent, frozen=True, kw_only=True, tag="PaymentInitiated"):
    """A payment was accepted for a booking; its idempotency key is drawn here, once."""

    booking_id: str
    saga_id: str | None
    amount: int
    currency: str
    customer_id: str | None
    payment_method: str
    idempotency_key: uuid.UUID


class ChargeAttempted(PaymentEvent, frozen=True, kw_only=True, tag="ChargeAttempted"):
    """One call to the gateway and what came of it (audit trail; never published)."""

    attempt: int
    processor: str
    result: AttemptResult
    detail: str


class ChargeStarted(PaymentEvent, frozen=True, kw_only=True, tag="ChargeStarted"):
    """Write-ahead: `charger` (one executor or reconciler run) is about to call the gateway.

    Until `lease_until` nobody else starts a charge of the payment; and once anyone else
    has started one, `charger` may no longer fail it as `processor_unavailable` (the other
    one's charge may still reach the gateway).
    """

    charger: uuid.UUID
    lease_until: datetime


class PaymentCompleted(PaymentEvent, frozen=True, kw_only=True, tag="PaymentCompleted"):
    """The gateway charged the payment."""

    processor: str
    provider_reference: str


class PaymentFailed(PaymentEvent, frozen=True, kw_only=True, tag="PaymentFailed"):
    """The payment ended without a charge."""

    reason: FailureReason
    detail: str
    decline_code: str | None = None


class PaymentFlaggedForReview(
    PaymentEvent, frozen=True, kw_only=True, tag="PaymentFlaggedForReview"
):
    """The outcome stayed unknown past the review window: a human must look (never failed)."""

    detail: str


ReviewOutcome = Literal["completed", "failed"]
# What the gateway said when the resolution looked the payment up.
GatewayAnswer = Literal["approved", "declined", "not_found", "unknown"]


class PaymentReviewResolved(PaymentEvent, frozen=True, kw_only=True, tag="PaymentReviewResolved"):
    """A human resolved a payment flagged for review: who, why, what the gateway said when
    it was asked, and whether the human overrode it (`forced`). The terminal event follows."""

    outcome: ReviewOutcome
    resolved_by: str
    reason: str
    gateway_answer: GatewayAnswer
    gateway_reference: str | None = None
    forced: bool = False


class RefundRequested(PaymentEvent, frozen=True, kw_only=True, tag="RefundRequested"):
    """A refund of `amount` was accepted; its own gateway idempotency key is drawn here, once.

    Counted against the refundable amount from now on, until it fails.
    """

    refund_id: uuid.UUID
    amount: int
    reason: str | None
    saga_id: str | None
    idempotency_key: uuid.UUID


class PaymentRefunded(PaymentEvent, frozen=True, kw_only=True, tag="PaymentRefunded"):
    """The gateway gave back a refund's amount."""

    refund_id: uuid.UUID
    amount: int
    processor: str
    provider_reference: str


class RefundFailed(PaymentEvent, frozen=True, kw_only=True, tag="RefundFailed"):
    """A requested refund ended without money going back; its amount is refundable again."""

    refund_id: uuid.UUID
    reason: RefundFailureReason
    detail: str
    decline_code: str | None = None


AnyPaymentEvent = (
    PaymentInitiated
    | ChargeAttempted
    | ChargeStarted
    | PaymentCompleted
    | PaymentFailed
    | PaymentFlaggedForReview
    | PaymentReviewResolved
    | RefundRequested
    | PaymentRefunded
    | RefundFailed
)

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[AnyPaymentEvent] = msgspec.json.Decoder(AnyPaymentEvent)


def encode_event(event: AnyPaymentEvent) -> bytes:
    """JSON of an event, with its `type` tag."""
    return _encoder.encode(event)


def decode_event(data: bytes | str) -> AnyPaymentEvent:
    """The event of `encode_event`'s JSON."""
    return _decoder.decode(data)


def event_type(event: AnyPaymentEvent) -> str:
    """The stored type name of an event."""
    return type(event).__name__
