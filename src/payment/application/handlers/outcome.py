"""Recording what a charge came to: its calls as ChargeAttempted, then the payment's outcome."""

from __future__ import annotations

import uuid
from datetime import datetime

from payment.application import failpoints
from payment.application.commands import InboundRef, TraceHeaders
from payment.application.conflicts import loaded_once, retrying
from payment.application.gateway import ChargeGateway, Exchange, Final
from payment.application.handlers.results import ExecuteResult
from payment.application.messages import OutboundMessage, outcome_message
from payment.application.ports import UnitOfWork, UnitOfWorkFactory
from payment.domain.events import AttemptResult
from payment.domain.payment import Payment, PaymentStatus
from payment.domain.processor import (
    Approved,
    Declined,
    GatewayErrorReplayed,
    ProcessorUnavailable,
)

REPLAYED_ERROR_DETAIL = (
    "the gateway replays a stored error for this payment's idempotency key: nothing can be"
    " charged under it until the key expires (Stripe: 24 h); see docs/operations.md"
)


async def record_outcome(
    uow_factory: UnitOfWorkFactory,
    gateway: ChargeGateway,
    payment_id: uuid.UUID,
    exchange: Exchange,
    inbound: InboundRef | None,
    trace: TraceHeaders,
    known: Payment | None = None,
    *,
    careful: bool = False,
) -> ExecuteResult:
    """Record `exchange` with the message that caused it; `known`: the payment as loaded
    before it (see `loaded_once`). `careful`: the caller knows the message may have been
    handled before (no first try that expects it new)."""
    current = loaded_once(payment_id, known)
    # The first try expects a new message (the common case): its unit of work then goes in
    # one message, and a redelivery fails it (DuplicateMessage) for a careful try.
    expect_new = not careful

    async def record(uow: UnitOfWork) -> ExecuteResult:
        nonlocal expect_new
        now = gateway.clock.now()
        # A redelivery handled before still records what its calls gave: a known outcome
        # is the gateway's answer under the payment's one key (the payment would wait for
        # the reconciler otherwise), and its attempts end its ChargeStarted's lease.
        duplicate = False
        if inbound is not None and expect_new:
            expect_new = False
            await uow.inbox.mark_new([(inbound.source, inbound.message_id)], now)
        elif inbound is not None:
            duplicate = not await uow.inbox.mark(inbound.source, inbound.message_id, now)
        payment = await current(uow)
        if payment.is_terminal:
            # Another execution recorded the outcome first (same idempotency key, so the
            # same charge): keep only the inbox mark.
            await uow.commit()
            return ExecuteResult.ALREADY_TERMINAL
        result, message = apply_outcome(payment, exchange, gateway.name, now, trace)
        await uow.save(payment)
        await uow.payments.set_status(payment_id, status_of(payment), now)
        if message is not None:
            await uow.outbox.add([message])
        terminal = payment.is_terminal
        if terminal:
            failpoints.hit("before_terminal_commit")
        await uow.commit()
        if terminal:
            failpoints.hit("after_terminal_commit")
        return ExecuteResult.DUPLICATE if duplicate and not terminal else result

    return await retrying(uow_factory, record, "execute_payment")


def apply_outcome(
    payment: Payment, exchange: Exchange, processor_name: str, now: datetime, trace: TraceHeaders
) -> tuple[ExecuteResult, OutboundMessage | None]:
    """Apply `exchange` to `payment` (its events not saved yet): the result, and the
    outcome message (None while the outcome is still unknown)."""
    for kind, item in exchange.attempts:
        payment.record_attempt(
            processor=processor_name, result=_result_of(item), detail=_detail_of(kind, item), at=now
        )
    result = _decide(payment, exchange.final, processor_name, now, exchange.charger)
    replayed = isinstance(exchange.final, GatewayErrorReplayed)
    if replayed and not payment.is_terminal and not payment.flagged_for_review:
        # Stuck for a day otherwise (until the key expires): a human is told at once.
        payment.flag_for_review(detail=REPLAYED_ERROR_DETAIL, at=now)
        result = ExecuteResult.FLAGGED
    if payment.is_terminal:
        # The trace of the message that caused this outcome (the request's, carried on
        # payment.initiated): contract section 2.
        return result, outcome_message(payment, trace)
    return result, None


def status_of(payment: Payment) -> PaymentStatus:
    """The payment's status for the index once an outcome is applied. Still unknown:
    INITIATED, which moves it to the end of the reconciler's queue, so a few unresolvable
    payments cannot starve newer ones."""
    return payment.status if payment.is_terminal else PaymentStatus.INITIATED


def _decide(
    payment: Payment, final: Final, processor_name: str, now: datetime, charger: uuid.UUID | None
) -> ExecuteResult:
    match final:
        case Approved():
            payment.complete(
                processor=processor_name, provider_reference=final.provider_reference, at=now
            )
            return ExecuteResult.COMPLETED
        case Declined():
            payment.fail(
                reason="declined",
                detail=f"payment declined by the processor ({final.code})",
                at=now,
                decline_code=final.code,
            )
            return ExecuteResult.FAILED
        case ProcessorUnavailable() if not payment.may_fail_unavailable(charger):
            # An earlier attempt's outcome is unknown, or another caller started a charge
            # that may still reach the gateway: "unavailable" now says nothing about
            # those, so the payment stays in flight for the reconciler.
            return ExecuteResult.UNKNOWN
        case ProcessorUnavailable():
            payment.fail(
                reason="processor_unavailable",
                detail="the payment processor could not be reached; no charge was made",
                at=now,
                charger=charger,
            )
            return ExecuteResult.FAILED
        case _:
            return ExecuteResult.UNKNOWN


def _result_of(item: Final) -> AttemptResult:
    match item:
        case Approved():
            return "approved"
        case Declined():
            return "declined"
        case ProcessorUnavailable():
            return "unavailable"
        case _:
            return "unknown"


def _detail_of(kind: str, item: Final) -> str:
    match item:
        case Approved():
            return f"{kind}: approved, reference {item.provider_reference}"
        case Declined():
            return f"{kind}: declined ({item.code})"
        case _:
            return f"{kind}: {type(item).__name__}: {item}"
