"""Commands: what the outside world asks the service to do (imperative names)."""

from __future__ import annotations

import uuid

import msgspec

from payment.domain.redaction import REDACTED


class TraceHeaders(msgspec.Struct, frozen=True, kw_only=True):
    """W3C Trace Context of the message that caused a command."""

    traceparent: str | None = None
    tracestate: str | None = None


class InboundRef(msgspec.Struct, frozen=True, kw_only=True):
    """Identity of the inbound message for deduplication: CloudEvents (source, id)."""

    source: str
    message_id: str


class RequestPayment(msgspec.Struct, frozen=True, kw_only=True):
    """The orchestrator asks to charge a booking; fields are as received, not yet validated."""

    inbound: InboundRef
    booking_id: str
    amount: int | None
    currency: str | None
    payment_method: str | None
    customer_id: str | None = None
    saga_id: str | None = None
    trace: TraceHeaders = TraceHeaders()

    def __repr__(self) -> str:
        # Never let the payment method (a token, perhaps a card number) reach a log line.
        return (
            f"RequestPayment(inbound={self.inbound!r}, booking_id={self.booking_id!r}, "
            f"amount={self.amount!r}, currency={self.currency!r}, payment_method={REDACTED})"
        )


class ExecutePayment(msgspec.Struct, frozen=True, kw_only=True):
    """Charge an initiated payment through the processor and record its outcome."""

    inbound: InboundRef
    payment_id: uuid.UUID
    trace: TraceHeaders = TraceHeaders()


class ReconcilePayment(msgspec.Struct, frozen=True, kw_only=True):
    """Resolve a payment whose outcome is still unknown after the threshold."""

    payment_id: uuid.UUID
    trace: TraceHeaders = TraceHeaders()


class ResolveReview(msgspec.Struct, frozen=True, kw_only=True):
    """An operator ends a payment flagged for review with the outcome the gateway shows."""

    payment_id: uuid.UUID
    outcome: str  # "completed" or "failed"
    reason: str
    resolved_by: str
    force: bool = False


class RefundPayment(msgspec.Struct, frozen=True, kw_only=True):
    """The orchestrator asks to refund a booking's payment (its compensation); fields as
    received, not yet validated. `amount` None: all that is still refundable."""

    inbound: InboundRef
    booking_id: str
    amount: int | None = None
    reason: str | None = None
    saga_id: str | None = None
    trace: TraceHeaders = TraceHeaders()


class SettleRefunds(msgspec.Struct, frozen=True, kw_only=True):
    """Take a payment's pending refunds to the gateway (or fail them if it was not charged)."""

    payment_id: uuid.UUID
    trace: TraceHeaders = TraceHeaders()
