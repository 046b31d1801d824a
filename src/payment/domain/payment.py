"""The Payment aggregate: INITIATED -> COMPLETED | FAILED, then COMPLETED ->
PARTIALLY_REFUNDED -> REFUNDED; decided here, rebuilt by replay.

What a payment knows and how each event changes it: state.py; its statuses: status.py;
the rules of its refunds: refund.py; of a human's review: review.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import TypedDict

from payment.domain.errors import (
    ChargeInProgress,
    IllegalTransition,
    NotCharged,
    RefundRefused,
    StreamMismatch,
)
from payment.domain.events import (
    AnyPaymentEvent,
    AttemptResult,
    ChargeAttempted,
    ChargeStarted,
    FailureReason,
    GatewayAnswer,
    PaymentCompleted,
    PaymentFailed,
    PaymentFlaggedForReview,
    PaymentInitiated,
    PaymentRefunded,
    PaymentReviewResolved,
    RefundFailed,
    RefundFailureReason,
    RefundRequested,
    ReviewOutcome,
)
from payment.domain.ids import new_id
from payment.domain.money import Money
from payment.domain.refund import Refund, check_refund_failure, pending_refund, refund_amount
from payment.domain.review import (
    MANUAL_REFERENCE,
    ReviewResolution,
    check_resolution,
    review_failure,
)
from payment.domain.state import PaymentState
from payment.domain.status import CHARGED, PaymentStatus, require_in_flight


class _Stamp(TypedDict):
    event_id: uuid.UUID
    payment_id: uuid.UUID
    version: int
    occurred_at: datetime


class Payment(PaymentState):
    """One payment of one booking, from its first event on (`Payment(initiated)`).

    Command methods check the transition, then apply their new events (state.py), keep
    them until the unit of work saves them (`collect_events`) and return them.
    """

    def __init__(self, initiated: PaymentInitiated) -> None:
        super().__init__(initiated)
        self._unsaved: list[AnyPaymentEvent] = []

    # -- creation and replay -----------------------------------------------------------

    @classmethod
    def initiate(
        cls,
        *,
        payment_id: uuid.UUID,
        booking_id: str,
        money: Money,
        payment_method: str,
        saga_id: str | None,
        customer_id: str | None,
        at: datetime,
        idempotency_key: uuid.UUID | None = None,
        event_id: uuid.UUID | None = None,
    ) -> tuple[Payment, list[AnyPaymentEvent]]:
        """A new payment and its `PaymentInitiated` event (version 1, not saved yet)."""
        event = PaymentInitiated(
            event_id=event_id or new_id(),
            payment_id=payment_id,
            version=1,
            occurred_at=at,
            booking_id=booking_id,
            saga_id=saga_id,
            amount=money.amount,
            currency=money.currency,
            customer_id=customer_id,
            payment_method=payment_method,
            # Drawn once here; every later gateway attempt reuses it.
            idempotency_key=idempotency_key or uuid.uuid4(),
        )
        payment = cls(event)
        payment._unsaved.append(event)
        return payment, [event]

    @classmethod
    def replay(cls, events: Iterable[AnyPaymentEvent]) -> Payment:
        """Rebuild a payment from its stored events, in version order."""
        stream = iter(events)
        first = next(stream, None)
        if first is None:
            raise StreamMismatch("cannot replay an empty stream")
        if not isinstance(first, PaymentInitiated):
            raise StreamMismatch("a stream starts with PaymentInitiated, and only there")
        payment = cls(first)
        for event in stream:
            payment.apply(event)
        return payment

    def collect_events(self) -> Sequence[AnyPaymentEvent]:
        """The events decided since the payment was loaded (or last collected), once: the
        unit of work appends them after version `version - len(events)`."""
        events, self._unsaved = self._unsaved, []
        return events

    # -- the charge --------------------------------------------------------------------

    def record_attempt(
        self, *, processor: str, result: AttemptResult, detail: str, at: datetime
    ) -> list[AnyPaymentEvent]:
        """Record one gateway call (an audit fact; allowed only while in flight)."""
        require_in_flight(self.status, "record an attempt")
        return self._emit(
            ChargeAttempted(
                **self._stamp(at),
                attempt=self.attempts + 1,
                processor=processor,
                result=result,
                detail=detail,
            )
        )

    def start_charge(
        self, *, charger: uuid.UUID, at: datetime, lease_s: float
    ) -> list[AnyPaymentEvent]:
        """Record, before the gateway call, that `charger` is about to charge.

        Raises `ChargeInProgress` while another charger's lease runs (one charger at a
        time per payment), `IllegalTransition` once the payment is terminal (nothing may
        be charged after an outcome is recorded).
        """
        require_in_flight(self.status, "start a charge")
        if self.charge_lease is not None:
            holder, until = self.charge_lease
            if holder != charger and at < until:
                raise ChargeInProgress(f"another charge of this payment runs until {until}")
        return self._emit(
            ChargeStarted(
                **self._stamp(at), charger=charger, lease_until=at + timedelta(seconds=lease_s)
            )
        )

    def complete(
        self, *, processor: str, provider_reference: str, at: datetime
    ) -> list[AnyPaymentEvent]:
        """INITIATED -> COMPLETED."""
        require_in_flight(self.status, "complete")
        return self._emit(
            PaymentCompleted(
                **self._stamp(at), processor=processor, provider_reference=provider_reference
            )
        )

    def fail(
        self,
        *,
        reason: FailureReason,
        detail: str,
        at: datetime,
        decline_code: str | None = None,
        charger: uuid.UUID | None = None,
    ) -> list[AnyPaymentEvent]:
        """INITIATED -> FAILED.

        `processor_unavailable` is refused once an attempt may have charged, or another
        caller than `charger` started a charge (`may_fail_unavailable`): only the
        gateway's real outcome may end such a payment.
        """
        require_in_flight(self.status, "fail")
        if reason == "processor_unavailable" and not self.may_fail_unavailable(charger):
            raise IllegalTransition(
                "cannot fail as unavailable: an earlier or concurrent charge may have happened"
            )
        return self._emit(
            PaymentFailed(
                **self._stamp(at), reason=reason, detail=detail, decline_code=decline_code
            )
        )

    # -- review ------------------------------------------------------------------------

    def flag_for_review(self, *, detail: str, at: datetime) -> list[AnyPaymentEvent]:
        """Mark an unresolvable in-flight payment for a human; once only."""
        require_in_flight(self.status, "flag for review")
        if self.flagged_for_review:
            raise IllegalTransition("payment is already flagged for review")
        return self._emit(PaymentFlaggedForReview(**self._stamp(at), detail=detail))

    def resolve_review(
        self,
        *,
        outcome: ReviewOutcome,
        resolved_by: str,
        reason: str,
        gateway_answer: GatewayAnswer,
        gateway_reference: str | None,
        processor: str,
        forced: bool,
        at: datetime,
    ) -> ReviewResolution:
        """A human ends a payment flagged for review: `PaymentReviewResolved`, then
        `PaymentCompleted` or `PaymentFailed`.

        The gateway's answer must back the outcome (approved for completed; declined or no
        charge for failed); otherwise `ReviewDisagreesWithGateway`, unless `forced`, which
        the event records.
        """
        require_in_flight(self.status, "resolve the review of")
        if not self.flagged_for_review:
            raise IllegalTransition("payment is not flagged for review")
        check_resolution(
            outcome=outcome,
            resolved_by=resolved_by,
            reason=reason,
            answer=gateway_answer,
            forced=forced,
        )
        resolved = PaymentReviewResolved(
            **self._stamp(at),
            outcome=outcome,
            resolved_by=resolved_by,
            reason=reason,
            gateway_answer=gateway_answer,
            gateway_reference=gateway_reference,
            forced=forced,
        )
        self._emit(resolved)
        ended: PaymentCompleted | PaymentFailed
        if outcome == "completed":
            reference = gateway_reference or MANUAL_REFERENCE
            ended = PaymentCompleted(
                **self._stamp(at), processor=processor, provider_reference=reference
            )
        else:
            # Not `fail`: a review may end as failed what an unknown attempt left in doubt.
            failure, detail = review_failure(gateway_answer)
            ended = PaymentFailed(**self._stamp(at), reason=failure, detail=detail)
        self._emit(ended)
        return ReviewResolution(resolved, ended)

    # -- refunds -----------------------------------------------------------------------

    def request_refund(
        self,
        *,
        refund_id: uuid.UUID,
        amount: int | None,
        reason: str | None,
        saga_id: str | None,
        at: datetime,
        idempotency_key: uuid.UUID | None = None,
    ) -> list[AnyPaymentEvent]:
        """Accept a refund of `amount` (None: all that is still refundable).

        Allowed while the charge is in flight (the refund then waits for its outcome) and
        once it is charged. Every refund not failed counts against the amount charged, so
        the refunded total can never exceed it. Raises `NotCharged` for a failed payment,
        `OverRefund` past the refundable amount, `RefundRefused` for an amount below 1 or a
        refund id used before.
        """
        if self.status is PaymentStatus.FAILED:
            raise NotCharged("the payment failed: nothing was charged")
        if refund_id in self.refunds:
            raise RefundRefused(f"refund {refund_id} was requested before")
        taken = refund_amount(asked=amount, refundable=self.refundable, charged=self.money.amount)
        return self._emit(
            RefundRequested(
                **self._stamp(at),
                refund_id=refund_id,
                amount=taken,
                reason=reason,
                saga_id=saga_id,
                # Drawn once here; every later gateway call for this refund reuses it.
                idempotency_key=idempotency_key or uuid.uuid4(),
            )
        )

    def complete_refund(
        self, *, refund_id: uuid.UUID, processor: str, provider_reference: str, at: datetime
    ) -> list[AnyPaymentEvent]:
        """A pending refund of a charged payment went through at the gateway."""
        refund = pending_refund(self.refunds, refund_id, "complete")
        if self.status not in CHARGED:
            raise IllegalTransition("cannot complete a refund of a payment not charged")
        return self._emit(
            PaymentRefunded(
                **self._stamp(at),
                refund_id=refund_id,
                amount=refund.amount,
                processor=processor,
                provider_reference=provider_reference,
            )
        )

    def fail_refund(
        self,
        *,
        refund_id: uuid.UUID,
        reason: RefundFailureReason,
        detail: str,
        at: datetime,
        decline_code: str | None = None,
    ) -> list[AnyPaymentEvent]:
        """A pending refund ended without money going back (see `check_refund_failure`)."""
        pending_refund(self.refunds, refund_id, "fail")
        check_refund_failure(reason, self.status)
        return self._emit(
            RefundFailed(
                **self._stamp(at),
                refund_id=refund_id,
                reason=reason,
                detail=detail,
                decline_code=decline_code,
            )
        )

    # -- helpers -----------------------------------------------------------------------

    def _stamp(self, at: datetime) -> _Stamp:
        return {
            "event_id": new_id(),
            "payment_id": self.id,
            "version": self.version + 1,
            "occurred_at": at,
        }

    def _emit(self, event: AnyPaymentEvent) -> list[AnyPaymentEvent]:
        self.apply(event)
        self._unsaved.append(event)
        return [event]


__all__ = ["CHARGED", "MANUAL_REFERENCE", "Payment", "PaymentStatus", "Refund"]
