"""Commands as the consumer builds them, for the handler unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from payment.application.commands import InboundRef, RefundPayment, RequestPayment, TraceHeaders

SAGA = "saga-orchestrator"
SELF = "payment-service"
TRACE = TraceHeaders(traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")

_ids: Iterator[int] = iter(range(1, 10**9))


def request_cmd(
    booking_id: str = "BK-1001",
    *,
    message_id: str | None = None,
    source: str = SAGA,
    **fields: Any,
) -> RequestPayment:
    """A valid request (125.00 EUR, a gateway token) with a fresh message id unless given;
    `fields` overrides any field."""
    values: dict[str, Any] = {
        "amount": 12_500,
        "currency": "EUR",
        "payment_method": "pm_card_visa",
        "customer_id": "cus_42",
        "saga_id": "saga-7",
        "trace": TRACE,
    }
    values.update(fields)
    return RequestPayment(
        inbound=InboundRef(source=source, message_id=message_id or f"req-{next(_ids)}"),
        booking_id=booking_id,
        **values,
    )


def refund_cmd(
    booking_id: str = "BK-1001",
    *,
    message_id: str | None = None,
    source: str = SAGA,
    **fields: Any,
) -> RefundPayment:
    """A refund request (all that is refundable unless `amount` is given) with a fresh
    message id unless given; `fields` overrides any field."""
    values: dict[str, Any] = {"saga_id": "saga-7", "reason": "trip cancelled", "trace": TRACE}
    values.update(fields)
    return RefundPayment(
        inbound=InboundRef(source=source, message_id=message_id or f"ref-{next(_ids)}"),
        booking_id=booking_id,
        **values,
    )
