"""The Payment aggregate: INITIATED -> COMPLETED | FAILED, then COMPLETED ->
PARTIALLY_REFUNDED -> REFUNDED; decided here and rebuilt by replay."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import TypedDict

import msgspec

from payment.domain.errors import (
    ChargeInProgress,
    IllegalTransition,
    NotCharged,
    OverRefund,
    RefundRefused,
    ReviewDisagreesWithGateway,
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
from payment.domain.money import Money

# The provider reference of a payment completed by a forced review without one from the
# gateway: the orchestrator sees that no gateway reference backs it.
MANUAL_REFERENCE = "manual-review"
_REVIEW_FAILURE_DETAIL = {
    "declined": "resolved by manual review: declined at the gateway",
    "not_found": "resolved by manual review: no charge at the gateway",
}


class _Stamp(TypedDict):
    event_id: uuid.UUID
    payment_id: uuid.UUID
    version: int
    occurred_at: datetime


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


def gateway_backs(outcome: ReviewOutcome, answer: GatewayAnswer) -> bool:
    """Whether the gateway's answer backs a review's outcome: approved for completed, a
    decline or no charge at all for failed; an unknown answer backs nothing."""
    if outcome == "completed":
        return answer == "approved"
    return answer in ("declined", "not_found")


class Payment:
    """One payment of one booking.

    Command methods check the transition, then return the new events after applying
    them; `apply` is the only place state changes, so `replay(stored events)` rebuilds
    exactly the state the commands left behind.
    """

    def __init__(self, payment_id: uuid.UUID) -> None:
        self.id = payment_id
        self.version = 0
        self.status: PaymentStatus | None = None
        self.booking_id = ""
        self.saga_id: str | None = None
        self.money: Money | None = None
        self.customer_id: str | None = None
        self.payment_method = ""
        self.idempotency_key: uuid.UUID | None = None
        self.initiated_at: datetime | None = None
        self.attempts = 0
        self.charge_may_have_happened = False
        self.flagged_for_review = False
        # Every caller that ever started a charge, and the latest one's lease.
        self.chargers: set[uuid.UUID] = set()
        self.charge_lease: tuple[uuid.UUID, datetime] | None = None
        self.unguarded_attempts = False
        self.initiated: PaymentInitiated | None = None
        self.outcome: PaymentCompleted | PaymentFailed | None = None
        self.review_resolution: PaymentReviewResolved | None = None
        self.refunds: dict[uuid.UUID, Refund] = {}
        self.refunded_total = 0

    # -- decisions ---------------------------------------------------------------------

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
        """A new payment and its `PaymentInitiated` event (version 1)."""
        payment = cls(payment_id)
        event = PaymentInitiated(
            event_id=event_id or uuid.uuid4(),
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
        payment.apply(event)
        return payment, [event]

    def record_attempt(
        self, *, processor: str, result: AttemptResult, detail: str, at: datetime
    ) -> list[AnyPaymentEvent]:
        """Record one gateway call (an audit fact; allowed only while in flight)."""
        self._require_in_flight("record an attempt")
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
        self._require_in_flight("start a charge")
        if self.charge_lease is not None:
            holder, until = self.charge_lease
            if holder != charger and at < until:
                raise ChargeInProgress(f"another charge of this payment runs until {until}")
        return self._emit(
            ChargeStarted(
                **self._stamp(at), charger=charger, lease_until=at + timedelta(seconds=lease_s)
            )
        )

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

    def complete(
        self, *, processor: str, provider_reference: str, at: datetime
    ) -> list[AnyPaymentEvent]:
        """INITIATED -> COMPLETED."""
        self._require_in_flight("complete")
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
        self._require_in_flight("fail")
        if reason == "processor_unavailable" and not self.may_fail_unavailable(charger):
            raise IllegalTransition(
                "cannot fail as unavailable: an earlier or concurrent charge may have happened"
            )
        return self._emit(
            PaymentFailed(
                **self._stamp(at), reason=reason, detail=detail, decline_code=decline_code
            )
        )

    def flag_for_review(self, *, detail: str, at: datetime) -> list[AnyPaymentEvent]:
        """Mark an unresolvable in-flight payment for a human; once only."""
        self._require_in_flight("flag for review")
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
    ) -> list[AnyPaymentEvent]:
        """A human ends a payment flagged for review: `PaymentReviewResolved`, then
        `PaymentCompleted` or `PaymentFailed`.

        The gateway's answer must back the outcome (approved for completed; declined or no
        charge for failed); otherwise `ReviewDisagreesWithGateway`, unless `forced`, which
        the event records.
        """
        self._require_in_flight("resolve the review of")
        if not self.flagged_for_review:
            raise IllegalTransition("payment is not flagged for review")
        if not resolved_by.strip() or not reason.strip():
            raise IllegalTransition("a review resolution names who resolved it and why")
        if not gateway_backs(outcome, gateway_answer) and not forced:
            raise ReviewDisagreesWithGateway(
                f"the gateway answers {gateway_answer}, which does not back {outcome}"
            )
        events = self._emit(
            PaymentReviewResolved(
                **self._stamp(at),
                outcome=outcome,
                resolved_by=resolved_by,
                reason=reason,
                gateway_answer=gateway_answer,
                gateway_reference=gateway_reference,
                forced=forced,
            )
        )
        if outcome == "completed":
            return events + self._emit(
                PaymentCompleted(
                    **self._stamp(at),
                    processor=processor,
                    provider_reference=gateway_reference or MANUAL_REFERENCE,
                )
            )
        return events + self._emit(
            PaymentFailed(
                **self._stamp(at),
                reason="declined" if gateway_answer == "declined" else "processor_unavailable",
                detail=_REVIEW_FAILURE_DETAIL.get(
                    gateway_answer,
                    f"resolved by manual review against the gateway's answer ({gateway_answer})",
                ),
            )
        )

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
        if self.status is None or self.money is None:
            raise IllegalTransition("cannot refund a payment that is not initiated")
        if self.status is PaymentStatus.FAILED:
            raise NotCharged("the payment failed: nothing was charged")
        if refund_id in self.refunds:
            raise RefundRefused(f"refund {refund_id} was requested before")
        refundable = self.refundable
        if amount is None:
            amount = refundable
            if amount == 0:
                raise OverRefund("nothing is left to refund")
        if amount < 1:
            raise RefundRefused("a refund amount must be at least 1")
        if amount > refundable:
            raise OverRefund(
                f"refund of {amount} exceeds the {refundable} still refundable "
                f"of {self.money.amount} charged"
            )
        return self._emit(
            RefundRequested(
                **self._stamp(at),
                refund_id=refund_id,
                amount=amount,
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
        refund = self._pending_refund(refund_id, "complete")
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
        """A pending refund ended without money going back.

        `not_charged` only once the payment failed; a gateway's answer (`declined`,
        `invalid_request`) only once it is charged: a refund waiting for its charge's
        outcome cannot fail for any other reason.
        """
        self._pending_refund(refund_id, "fail")
        if reason == "not_charged":
            if self.status is not PaymentStatus.FAILED:
                raise IllegalTransition("a refund is not_charged only when its payment failed")
        elif self.status not in CHARGED:
            raise IllegalTransition(f"cannot fail a refund as {reason} before the charge")
        return self._emit(
            RefundFailed(
                **self._stamp(at),
                refund_id=refund_id,
                reason=reason,
                detail=detail,
                decline_code=decline_code,
            )
        )

    # -- state -------------------------------------------------------------------------

    @property
    def is_terminal(self) -> bool:
        """The charge's outcome is known (refunds may still follow)."""
        return self.status is PaymentStatus.FAILED or self.status in CHARGED

    @property
    def refundable(self) -> int:
        """What may still be refunded: charged minus every refund not failed."""
        if self.money is None:
            return 0
        committed = sum(
            r.amount for r in self.refunds.values() if not isinstance(r.outcome, RefundFailed)
        )
        return self.money.amount - committed

    @property
    def pending_refunds(self) -> list[Refund]:
        """Refunds requested whose outcome is not known yet, in the order requested."""
        return [r for r in self.refunds.values() if r.pending]

    @classmethod
    def replay(cls, events: Iterable[AnyPaymentEvent]) -> Payment:
        """Rebuild a payment from its stored events, in version order."""
        payment: Payment | None = None
        for event in events:
            if payment is None:
                payment = cls(event.payment_id)
            payment.apply(event)
        if payment is None:
            raise StreamMismatch("cannot replay an empty stream")
        return payment

    def apply(self, event: AnyPaymentEvent) -> None:
        """Evolve the state by one event: the only way state changes."""
        if event.payment_id != self.id:
            raise StreamMismatch(f"event of stream {event.payment_id} applied to {self.id}")
        if event.version != self.version + 1:
            raise StreamMismatch(f"event version {event.version} after version {self.version}")
        if isinstance(event, PaymentInitiated) != (self.version == 0):
            raise StreamMismatch("a stream starts with PaymentInitiated, and only there")
        match event:
            case PaymentInitiated():
                self.status = PaymentStatus.INITIATED
                self.booking_id = event.booking_id
                self.saga_id = event.saga_id
                self.money = Money(amount=event.amount, currency=event.currency)
                self.customer_id = event.customer_id
                self.payment_method = event.payment_method
                self.idempotency_key = event.idempotency_key
                self.initiated_at = event.occurred_at
                self.initiated = event
            case ChargeAttempted():
                # The charger recorded what its calls gave: its lease ends. (Only the
                # lease holder charges while it runs; `chargers` keeps the safety rule.)
                self.charge_lease = None
                if not self.chargers:
                    self.unguarded_attempts = True  # recorded before any write-ahead
                self.attempts = event.attempt
                if event.result in ("unknown", "approved"):
                    self.charge_may_have_happened = True
            case ChargeStarted():
                self.chargers.add(event.charger)
                self.charge_lease = (event.charger, event.lease_until)
            case PaymentCompleted():
                self.status = PaymentStatus.COMPLETED
                self.outcome = event
            case PaymentFailed():
                self.status = PaymentStatus.FAILED
                self.outcome = event
            case PaymentFlaggedForReview():
                self.flagged_for_review = True
            case PaymentReviewResolved():
                self.review_resolution = event
            case RefundRequested():
                self.refunds[event.refund_id] = Refund(requested=event)
            case PaymentRefunded():
                refund = self.refunds[event.refund_id]
                self.refunds[event.refund_id] = msgspec.structs.replace(refund, outcome=event)
                self.refunded_total += event.amount
                assert self.money is not None
                self.status = (
                    PaymentStatus.REFUNDED
                    if self.refunded_total >= self.money.amount
                    else PaymentStatus.PARTIALLY_REFUNDED
                )
            case RefundFailed():
                refund = self.refunds[event.refund_id]
                self.refunds[event.refund_id] = msgspec.structs.replace(refund, outcome=event)
        self.version = event.version

    # -- helpers -----------------------------------------------------------------------

    def _require_in_flight(self, action: str) -> None:
        if self.status is not PaymentStatus.INITIATED:
            state = self.status.value if self.status else "not initiated"
            raise IllegalTransition(f"cannot {action} a payment that is {state}")

    def _pending_refund(self, refund_id: uuid.UUID, action: str) -> Refund:
        refund = self.refunds.get(refund_id)
        if refund is None:
            raise IllegalTransition(f"cannot {action} refund {refund_id}: never requested")
        if not refund.pending:
            raise IllegalTransition(f"cannot {action} refund {refund_id}: already settled")
        return refund

    def _stamp(self, at: datetime) -> _Stamp:
        return {
            "event_id": uuid.uuid4(),
            "payment_id": self.id,
            "version": self.version + 1,
            "occurred_at": at,
        }

    def _emit(self, event: AnyPaymentEvent) -> list[AnyPaymentEvent]:
        self.apply(event)
        return [event]
