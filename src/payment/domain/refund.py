"""Refunds of a payment: each one's request and outcome, and the rules that bound them."""

from __future__ import annotations

import uuid

import msgspec

from payment.domain.errors import IllegalTransition, OverRefund, RefundRefused
from payment.domain.events import (
    PaymentRefunded,
    RefundFailed,
    RefundFailureReason,
    RefundRequested,
)
from payment.domain.status import CHARGED, PaymentStatus


class Refund(msgspec.Struct, frozen=True, kw_only=True):
    """One refund of a payment: its request and, once known, its outcome."""

    requested: RefundRequested
    outcome: PaymentRefunded | RefundFailed | None = None

    @property
    def id(self) -> uuid.UUID:
        return self.requested.refund_id

    @property
    def amount(self) -> int:
        return self.requested.amount

    @property
    def pending(self) -> bool:
        return self.outcome is None


def refund_amount(*, asked: int | None, refundable: int, charged: int) -> int:
    """The amount a new refund takes (`asked` None: all that is still refundable).

    Raises `OverRefund` past the refundable amount, `RefundRefused` for an amount below 1.
    """
    amount = refundable if asked is None else asked
    if asked is None and amount == 0:
        raise OverRefund("nothing is left to refund")
    if amount < 1:
        raise RefundRefused("a refund amount must be at least 1")
    if amount > refundable:
        raise OverRefund(
            f"refund of {amount} exceeds the {refundable} still refundable of {charged} charged"
        )
    return amount


def pending_refund(refunds: dict[uuid.UUID, Refund], refund_id: uuid.UUID, action: str) -> Refund:
    """The refund `refund_id` if its outcome is still to come; `IllegalTransition` if not."""
    refund = refunds.get(refund_id)
    if refund is None:
        raise IllegalTransition(f"cannot {action} refund {refund_id}: never requested")
    if not refund.pending:
        raise IllegalTransition(f"cannot {action} refund {refund_id}: already settled")
    return refund


def check_refund_failure(reason: RefundFailureReason, status: PaymentStatus) -> None:
    """`not_charged` only once the payment failed; a gateway's answer (`declined`,
    `invalid_request`) only once it is charged: a refund waiting for its charge's outcome
    cannot fail for any other reason."""
    if reason == "not_charged":
        if status is not PaymentStatus.FAILED:
            raise IllegalTransition("a refund is not_charged only when its payment failed")
    elif status not in CHARGED:
        raise IllegalTransition(f"cannot fail a refund as {reason} before the charge")
