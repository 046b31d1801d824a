"""What a payment knows, evolved one stored event at a time (`PaymentState.apply`).

The decisions that emit those events are the aggregate's (payment.py).
"""

from __future__ import annotations

import uuid
from datetime import datetime

import msgspec

from payment.domain import events as e
from payment.domain.errors import StreamMismatch
from payment.domain.money import Money
from payment.domain.refund import Refund
from payment.domain.status import CHARGED, PaymentStatus


class PaymentState:
    """The state of one payment, from its first event on: nothing is missing after
    `PaymentInitiated`, and `apply` is the only way it changes, so a replay of the stored
    events rebuilds exactly what the commands left behind."""

    def __init__(self, initiated: e.PaymentInitiated) -> None:
        if initiated.version != 1:
            raise StreamMismatch("a stream starts with PaymentInitiated at version 1")
        self.id = initiated.payment_id
        self.version = 1
        self.status = PaymentStatus.INITIATED
        self.initiated = initiated
        self.booking_id = initiated.booking_id
        self.saga_id = initiated.saga_id
        self.money = Money(amount=initiated.amount, currency=initiated.currency)
        self.customer_id = initiated.customer_id
        self.payment_method = initiated.payment_method
        self.idempotency_key = initiated.idempotency_key
        self.initiated_at = initiated.occurred_at
        self.attempts = 0
        self.charge_may_have_happened = False
        self.flagged_for_review = False
        # Every caller that ever started a charge, and the latest one's lease.
        self.chargers: set[uuid.UUID] = set()
        self.charge_lease: tuple[uuid.UUID, datetime] | None = None
        self.unguarded_attempts = False
        self.outcome: e.PaymentCompleted | e.PaymentFailed | None = None
        self.review_resolution: e.PaymentReviewResolved | None = None
        self.refunds: dict[uuid.UUID, Refund] = {}
        self.refunded_total = 0

    def may_fail_unavailable(self, charger: uuid.UUID | None) -> bool:
        """Whether `charger` may end the payment as `processor_unavailable` now.

        Only if no charge may have happened and nobody but `charger` ever started one
        (`charger` None: nobody at all): another charger's request may still be on its
        way to the gateway, and an approval must never meet a failed payment.
        """
        if self.charge_may_have_happened:
            return False
        return self.chargers <= ({charger} if charger is not None else set())

    def only_charger(self, charger: uuid.UUID | None) -> bool:
        """Whether the stream proves `charger` the only caller that ever charged it.

        True when every charge call was written ahead (no attempt before the first
        ChargeStarted), all by `charger`, and none may have charged: nobody else's
        charge can be at the gateway, so no lookup is needed to rule one out.
        """
        return (
            charger is not None
            and self.chargers == {charger}
            and not self.unguarded_attempts
            and not self.charge_may_have_happened
        )

    # -- state -------------------------------------------------------------------------

    @property
    def is_terminal(self) -> bool:
        """The charge's outcome is known (refunds may still follow)."""
        return self.status is PaymentStatus.FAILED or self.status in CHARGED

    @property
    def refundable(self) -> int:
        """What may still be refunded: charged minus every refund not failed."""
        committed = sum(
            r.amount for r in self.refunds.values() if not isinstance(r.outcome, e.RefundFailed)
        )
        return self.money.amount - committed

    @property
    def pending_refunds(self) -> list[Refund]:
        """Refunds requested whose outcome is not known yet, in the order requested."""
        return [r for r in self.refunds.values() if r.pending]

    def apply(self, event: e.AnyPaymentEvent) -> None:
        """Evolve the state by one event after the first: the only way state changes."""
        if event.payment_id != self.id:
            raise StreamMismatch(f"event of stream {event.payment_id} applied to {self.id}")
        if event.version != self.version + 1:
            raise StreamMismatch(f"event version {event.version} after version {self.version}")
        match event:
            case e.PaymentInitiated():
                raise StreamMismatch("a stream starts with PaymentInitiated, and only there")
            case e.ChargeAttempted():
                # The charger recorded what its calls gave: its lease ends. (Only the
                # lease holder charges while it runs; `chargers` keeps the safety rule.)
                self.charge_lease = None
                if not self.chargers:
                    self.unguarded_attempts = True  # recorded before any write-ahead
                self.attempts = event.attempt
                if event.result in ("unknown", "approved"):
                    self.charge_may_have_happened = True
            case e.ChargeStarted():
                self.chargers.add(event.charger)
                self.charge_lease = (event.charger, event.lease_until)
            case e.PaymentCompleted():
                self.status = PaymentStatus.COMPLETED
                self.outcome = event
            case e.PaymentFailed():
                self.status = PaymentStatus.FAILED
                self.outcome = event
            case e.PaymentFlaggedForReview():
                self.flagged_for_review = True
            case e.PaymentReviewResolved():
                self.review_resolution = event
            case e.RefundRequested():
                self.refunds[event.refund_id] = Refund(requested=event)
            case e.PaymentRefunded() | e.RefundFailed():
                refund = self.refunds[event.refund_id]
                self.refunds[event.refund_id] = msgspec.structs.replace(refund, outcome=event)
                if isinstance(event, e.PaymentRefunded):
                    self.refunded_total += event.amount
                    self.status = (
                        PaymentStatus.REFUNDED
                        if self.refunded_total >= self.money.amount
                        else PaymentStatus.PARTIALLY_REFUNDED
                    )
        self.version = event.version
