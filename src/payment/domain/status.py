"""Where a payment stands: INITIATED -> COMPLETED | FAILED, then COMPLETED ->
PARTIALLY_REFUNDED -> REFUNDED."""

from __future__ import annotations

import enum

from payment.domain.errors import IllegalTransition


class PaymentStatus(enum.StrEnum):
    INITIATED = "INITIATED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    PARTIALLY_REFUNDED = "PARTIALLY_REFUNDED"
    REFUNDED = "REFUNDED"


# The states in which the payment's money was taken (and may be given back).
CHARGED = frozenset(
    {PaymentStatus.COMPLETED, PaymentStatus.PARTIALLY_REFUNDED, PaymentStatus.REFUNDED}
)


def require_in_flight(status: PaymentStatus, action: str) -> None:
    """Raise `IllegalTransition` unless the charge's outcome is still to come."""
    if status is not PaymentStatus.INITIATED:
        raise IllegalTransition(f"cannot {action} a payment that is {status.value}")
