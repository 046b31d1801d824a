"""The messages of the contract, each with its channel, CloudEvents type and Kafka key."""

from __future__ import annotations

from typing import Final, NamedTuple

import msgspec

from payment.application.messages import (
    MESSAGE_VERSIONS,
    PAYMENT_COMPLETED,
    PAYMENT_FAILED,
    PAYMENT_INITIATED,
    PAYMENT_REFUND_FAILED,
    PAYMENT_REFUNDED,
    REFUND_PAYMENT,
    REQUEST_PAYMENT,
    OutboundType,
    PaymentCompletedMessage,
    PaymentFailedMessage,
    PaymentInitiatedMessage,
    PaymentRefundedMessage,
    PaymentRefundFailedMessage,
    RefundPaymentMessage,
    RequestPaymentMessage,
)
from payment.devtools.asyncapi.rules import Schema


class MessageSpec(NamedTuple):
    """One message of the contract, at one schema version, and where it travels.

    Outbound messages are listed once per schema version (`version`; None for the inbound
    request, whose shape the orchestrator owns): a row queued by an earlier release is
    still published under its own version, so a version's entry stays when a newer one is
    added (its struct kept, renamed `…MessageV<N>`).
    """

    name: str
    channel: str
    topic_field: str
    ce_type: str
    struct: type[msgspec.Struct]
    summary: str
    key: Schema
    version: int | None = None

    @property
    def id(self) -> str:
        """The message's key in the document: its name, with `V<version>` when versioned."""
        return self.name if self.version is None else f"{self.name}V{self.version}"


_BOOKING_ID_KEY: Final[Schema] = {"type": "string", "description": "The booking id."}
_PAYMENT_ID_KEY: Final[Schema] = {
    "type": "string",
    "format": "uuid",
    "description": "The payment id.",
}


def _inbound(
    name: str, topic_field: str, ce_type: str, struct: type[msgspec.Struct], summary: str
) -> MessageSpec:
    """A request from the orchestrator: keyed by booking, on a `saga…` channel, unversioned."""
    return MessageSpec(
        name, f"saga{name}", topic_field, ce_type, struct, summary, key=_BOOKING_ID_KEY
    )


def _outbound(
    name: str,
    topic_field: str,
    ce_type: OutboundType,
    struct: type[msgspec.Struct],
    summary: str,
    key: Schema = _PAYMENT_ID_KEY,
) -> MessageSpec:
    """An event the service publishes, at its current schema version."""
    channel = name[0].lower() + name[1:]
    return MessageSpec(
        name, channel, topic_field, ce_type, struct, summary, key, MESSAGE_VERSIONS[ce_type]
    )


MESSAGES: Final = (
    _inbound(
        "RequestPayment",
        "request",
        REQUEST_PAYMENT,
        RequestPaymentMessage,
        "The orchestrator asks to charge a booking.",
    ),
    _outbound(
        "PaymentInitiated",
        "initiated",
        PAYMENT_INITIATED,
        PaymentInitiatedMessage,
        "A payment was accepted for a booking; its outcome follows.",
    ),
    _outbound(
        "PaymentCompleted",
        "completed",
        PAYMENT_COMPLETED,
        PaymentCompletedMessage,
        "The payment was charged (terminal).",
    ),
    _outbound(
        "PaymentFailed",
        "failed",
        PAYMENT_FAILED,
        PaymentFailedMessage,
        "The payment ended without a charge, or the request was rejected (terminal).",
        key={
            "type": "string",
            "description": (
                "The payment id; the booking id for a rejected request that created no payment."
            ),
        },
    ),
    _inbound(
        "RefundPayment",
        "refund",
        REFUND_PAYMENT,
        RefundPaymentMessage,
        "The orchestrator asks to refund a booking's payment (its compensation).",
    ),
    _outbound(
        "PaymentRefunded",
        "refunded",
        PAYMENT_REFUNDED,
        PaymentRefundedMessage,
        "A refund went through at the gateway (terminal for that refund).",
    ),
    _outbound(
        "PaymentRefundFailed",
        "refund_failed",
        PAYMENT_REFUND_FAILED,
        PaymentRefundFailedMessage,
        "A refund request ended without money going back (terminal for that request).",
        key={
            "type": "string",
            "description": "The payment id; the booking id when the booking has no payment.",
        },
    ),
)

DEAD_LETTER: Final = "DeadLetter"
DEAD_LETTER_CHANNEL: Final = "paymentDeadLetter"
