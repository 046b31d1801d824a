"""Refunds, the SAGA's compensation: recorded against the payment, then settled at the gateway.

A `saga.refund_payment` is handled in one transaction (inbox mark, `RefundRequested` with
its own idempotency key, the payment's refunds-pending mark, or a `refund_failed` outbox
row), appended under the stream's optimistic lock: the aggregate counts every refund not
failed, so concurrent requests can never take the refunded total past the charge. The
gateway is called after that commit, outside any transaction, and its answer recorded in
another (with `payment.refunded` / `payment.refund_failed`). A refund whose charge is
still in flight, or whose gateway call did not answer, stays pending; `RefundWorker`
settles it once the charge has settled, or after the threshold (docs/refunds.md).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from payment.application.commands import RefundPayment, SettleRefunds, TraceHeaders
from payment.application.conflicts import retrying
from payment.application.gateway import ExecutionPolicy
from payment.application.handlers.request import RequestPolicy
from payment.application.messages import (
    OutboundMessage,
    RefundFailedReason,
    refund_failed_message,
    refund_refused_message,
    refunded_message,
)
from payment.application.ports import Clock, UnitOfWork, UnitOfWorkFactory
from payment.application.validation import validate_refund, well_formed_booking_id
from payment.domain.errors import RefundRefused
from payment.domain.events import (
    AnyPaymentEvent,
    PaymentCompleted,
    PaymentFailed,
    PaymentRefunded,
    RefundFailed,
)
from payment.domain.ids import new_id
from payment.domain.money import Money
from payment.domain.payment import Payment, PaymentStatus, Refund
from payment.domain.processor import (
    OutcomeUnknown,
    PaymentProcessor,
    ProcessorUnavailable,
    RefundDeclined,
    Refunded,
    RefundOutcome,
    RefundRequest,
)

log = logging.getLogger(__name__)


class RefundResult(enum.StrEnum):
    DUPLICATE = "duplicate"  # handled before: nothing changed
    REJECTED = "rejected"  # broke a rule of contract 3: refund_failed / invalid_request
    REFUSED = "refused"  # not_charged or over_refund: refund_failed, no refund created
    CLOSED = "closed"  # no payment: booking closed, refund_failed / not_charged
    ACCEPTED = "accepted"  # refund requested; settled now or when its charge settles


class SettleResult(enum.StrEnum):
    REFUNDED = "refunded"
    FAILED = "failed"  # declined, invalid, or not_charged
    UNKNOWN = "unknown"  # no answer: stays pending for the worker
    WAITING = "waiting"  # the charge is still in flight
    SETTLED = "settled"  # someone else recorded it first


class Refunds:
    """The refund exchange: the processor, clock, policy and limits it needs, held once.

    Every gateway call goes through the one `processor` the service was built with (so a
    wrapper around it, limits or instrumentation, covers refunds as it covers charges).
    """

    def __init__(
        self,
        uow_factory: UnitOfWorkFactory,
        processor: PaymentProcessor,
        clock: Clock,
        policy: ExecutionPolicy = ExecutionPolicy(),
        request_policy: RequestPolicy = RequestPolicy(),
    ) -> None:
        self._uow_factory = uow_factory
        self._processor = processor
        self._clock = clock
        self._policy = policy
        self._request_policy = request_policy

    # -- saga.refund_payment -----------------------------------------------------------

    async def request(self, cmd: RefundPayment) -> tuple[RefundResult, uuid.UUID | None]:
        """Record the refund (or its refusal) once; the result and the payment's id.

        The caller settles an accepted refund afterwards (`settle`); if it never gets to,
        the refund stays pending and the worker settles it.
        """
        problem = validate_refund(cmd, max_amount=self._request_policy.max_amount)

        async def handle(uow: UnitOfWork) -> tuple[RefundResult, uuid.UUID | None]:
            if not await uow.inbox.mark(
                cmd.inbound.source, cmd.inbound.message_id, self._clock.now()
            ):
                return RefundResult.DUPLICATE, None
            result, payment_id = await self._request_in(uow, cmd, problem)
            await uow.commit()
            return result, payment_id

        # Another writer of the stream or booking won: read afresh.
        return await retrying(self._uow_factory, handle, "refund_payment")

    async def _request_in(
        self, uow: UnitOfWork, cmd: RefundPayment, problem: str | None
    ) -> tuple[RefundResult, uuid.UUID | None]:
        now = self._clock.now()
        payment_id = None
        if well_formed_booking_id(cmd.booking_id):
            payment_id = await uow.payments.payment_for_booking(cmd.booking_id)
        if payment_id is None:
            if problem is not None:
                await uow.outbox.add([self._refused(cmd, "invalid_request", problem, None)])
                return RefundResult.REJECTED, None
            payment_id = await uow.payments.close_booking(cmd.booking_id, now)
            if payment_id is None:
                detail = "the booking has no payment: it is closed, and nothing will be charged"
                await uow.outbox.add([self._refused(cmd, "not_charged", detail, None)])
                return RefundResult.CLOSED, None
            # A payment request won the booking meanwhile: refund that payment.
        payment = await uow.load(payment_id)
        if problem is not None:
            await uow.outbox.add([self._refused(cmd, "invalid_request", problem, payment)])
            return RefundResult.REJECTED, payment_id
        try:
            payment.request_refund(
                refund_id=new_id(),
                amount=cmd.amount,
                reason=cmd.reason,
                saga_id=cmd.saga_id,
                at=now,
            )
        except RefundRefused as exc:
            await uow.outbox.add([self._refused(cmd, exc.reason, str(exc), payment)])
            return RefundResult.REFUSED, payment_id
        # The optimistic lock: a concurrent refund (or outcome) of this payment makes this
        # append fail, and the retry decides again on the state that includes it.
        await uow.save(payment)
        await uow.payments.set_refunds_pending(payment_id, now)
        return RefundResult.ACCEPTED, payment_id

    def _refused(
        self,
        cmd: RefundPayment,
        reason: RefundFailedReason,
        detail: str,
        payment: Payment | None,
    ) -> OutboundMessage:
        return refund_refused_message(
            booking_id=cmd.booking_id,
            saga_id=cmd.saga_id,
            reason=reason,
            detail=detail,
            at=self._clock.now(),
            trace=cmd.trace,
            payment=payment,
        )

    # -- settling ----------------------------------------------------------------------

    async def due(self, threshold: timedelta, limit: int) -> list[uuid.UUID]:
        """Payments whose pending refunds are due for `settle` (see `RefundWorker`)."""
        async with self._uow_factory() as uow:
            return await uow.payments.refunds_due(self._clock.now() - threshold, limit)

    async def settle(
        self, cmd: SettleRefunds, *, look_up_first: bool = False
    ) -> list[SettleResult]:
        """Settle the payment's pending refunds: at the gateway once it is charged,
        `not_charged` once it failed, nothing while it is in flight.

        `look_up_first`: ask the gateway for each refund before refunding (the worker's
        path: an earlier call may have refunded, and its key may have expired).
        """
        async with self._uow_factory() as uow:
            payment = await uow.load(cmd.payment_id)
        pending = payment.pending_refunds
        if not pending:
            return []
        match payment.outcome:
            case None:
                return [SettleResult.WAITING]
            case PaymentFailed():
                return [await self._record(cmd.payment_id, cmd.trace, _not_charged)]
            case PaymentCompleted() as charged:
                outcomes = await asyncio.gather(
                    *(self._refund_at_gateway(payment, charged, r, look_up_first) for r in pending)
                )
                name = self._processor.name
                return [
                    await self._record(
                        cmd.payment_id, cmd.trace, _outcome_of(refund.id, outcome, name)
                    )
                    for refund, outcome in zip(pending, outcomes, strict=True)
                ]

    async def _refund_at_gateway(
        self, payment: Payment, charged: PaymentCompleted, refund: Refund, look_up_first: bool
    ) -> RefundOutcome | None:
        """The gateway's answer for one refund, None when it gave none (still unknown)."""
        request = RefundRequest(
            refund_id=refund.id,
            payment_id=payment.id,
            booking_id=payment.booking_id,
            money=Money(amount=refund.amount, currency=payment.money.currency),
            charge_reference=charged.provider_reference,
            idempotency_key=refund.requested.idempotency_key,
        )
        policy = self._policy
        if look_up_first:
            try:
                async with asyncio.timeout(policy.call_timeout_s):
                    found = await self._processor.lookup_refund(request)
            except (ProcessorUnavailable, OutcomeUnknown, TimeoutError):
                return None
            if found is not None:
                return found
        for attempt in range(1, policy.max_attempts + 1):
            try:
                async with asyncio.timeout(policy.call_timeout_s):
                    return await self._processor.refund(request)
            except (OutcomeUnknown, TimeoutError):
                # The refund may have been made: never a failure; settled later.
                return None
            except ProcessorUnavailable:
                if attempt == policy.max_attempts:
                    return None  # not made; a refund never fails for an outage
                await asyncio.sleep(policy.backoff_s(attempt))
        return None

    async def _record(
        self,
        payment_id: uuid.UUID,
        trace: TraceHeaders,
        decide: Decision,
    ) -> SettleResult:
        """Apply `decide` to the payment as stored now, in one transaction with its outbox
        rows and refunds-pending mark; retried afresh when another writer came first."""

        async def record(uow: UnitOfWork) -> SettleResult:
            now = self._clock.now()
            payment = await uow.load(payment_id)
            try:
                new = decide(payment, now)
            except _AlreadySettled:
                return SettleResult.SETTLED
            if not new:
                if not payment.pending_refunds:
                    return SettleResult.SETTLED
                # No answer: to the back of the worker's queue (if still marked).
                await uow.payments.requeue_refunds(payment_id, now)
                await uow.commit()
                return SettleResult.UNKNOWN
            messages = [_message_of(payment, event, trace) for event in new]
            await uow.save(payment)
            await uow.outbox.add([m for m in messages if m is not None])
            if not payment.pending_refunds:
                # Cleared only beside an append: the stream's lock orders it after every
                # refund request that marked it.
                await uow.payments.set_refunds_pending(payment_id, None)
            await uow.commit()
            if any(isinstance(e, PaymentRefunded) for e in new):
                return SettleResult.REFUNDED
            return SettleResult.FAILED

        return await retrying(self._uow_factory, record, "settle refunds")


# Applied to the payment as stored now: the events to record (raise _AlreadySettled when
# there is nothing left to decide).
Decision = Callable[[Payment, datetime], list[AnyPaymentEvent]]


class _AlreadySettled(Exception):
    """The refund was recorded by someone else first (same key: the same gateway refund)."""


def _not_charged(payment: Payment, now: datetime) -> list[AnyPaymentEvent]:
    if payment.status is not PaymentStatus.FAILED or not payment.pending_refunds:
        raise _AlreadySettled
    new: list[AnyPaymentEvent] = []
    for refund in payment.pending_refunds:
        new += payment.fail_refund(
            refund_id=refund.id,
            reason="not_charged",
            detail="the payment failed: nothing was charged, nothing to refund",
            at=now,
        )
    return new


def _outcome_of(refund_id: uuid.UUID, outcome: RefundOutcome | None, processor: str) -> Decision:
    def decide(payment: Payment, now: datetime) -> list[AnyPaymentEvent]:
        refund = payment.refunds.get(refund_id)
        if refund is None or not refund.pending:
            raise _AlreadySettled
        match outcome:
            case Refunded():
                return payment.complete_refund(
                    refund_id=refund_id,
                    processor=processor,
                    provider_reference=outcome.provider_reference,
                    at=now,
                )
            case RefundDeclined():
                return payment.fail_refund(
                    refund_id=refund_id,
                    reason="invalid_request" if outcome.invalid else "declined",
                    detail=f"refund declined by the processor ({outcome.code})",
                    decline_code=outcome.code,
                    at=now,
                )
            case _:
                return []

    return decide


def _message_of(
    payment: Payment, event: AnyPaymentEvent, trace: TraceHeaders
) -> OutboundMessage | None:
    if isinstance(event, PaymentRefunded):
        return refunded_message(payment, event, trace)
    if isinstance(event, RefundFailed):
        return refund_failed_message(payment, event, trace)
    return None
