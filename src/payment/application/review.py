"""Resolving a payment flagged for review: ask the gateway, then record who, why and what.

A payment is flagged when its outcome stayed unknown past the review window (or the
gateway replays a stored error). A human looks at the gateway and tells the service the
outcome; the service looks the payment up itself first and refuses an outcome that the
gateway's answer does not back, unless the human forces it (recorded in the event).
The terminal event is published through the outbox like any other.
"""

from __future__ import annotations

import msgspec

from payment.application.commands import ResolveReview, TraceHeaders
from payment.application.conflicts import retrying
from payment.application.gateway import charge_request
from payment.application.messages import outcome_message
from payment.application.ports import Clock, UnitOfWork, UnitOfWorkFactory
from payment.application.validation import mask_card_numbers
from payment.domain.errors import IllegalTransition
from payment.domain.events import GatewayAnswer, PaymentReviewResolved, ReviewOutcome
from payment.domain.payment import Payment
from payment.domain.processor import (
    Approved,
    Declined,
    PaymentProcessor,
    ProcessorError,
)

OUTCOMES: tuple[ReviewOutcome, ...] = ("completed", "failed")


class NoSuchPayment(LookupError):
    """No payment has this id."""


class ReviewLookup(msgspec.Struct, frozen=True, kw_only=True):
    """What the gateway said about a payment when the review asked."""

    answer: GatewayAnswer
    reference: str | None = None
    detail: str = ""


async def look_up(payment: Payment, processor: PaymentProcessor) -> ReviewLookup:
    """The gateway's answer for `payment` (its one idempotency key); never raises."""
    try:
        found = await processor.lookup(charge_request(payment))
    except ProcessorError as exc:
        return ReviewLookup(answer="unknown", detail=type(exc).__name__)
    match found:
        case Approved():
            return ReviewLookup(answer="approved", reference=found.provider_reference)
        case Declined():
            return ReviewLookup(answer="declined", detail=found.code)
        case _:
            return ReviewLookup(answer="not_found")


async def resolve_review(
    cmd: ResolveReview,
    uow_factory: UnitOfWorkFactory,
    processor: PaymentProcessor,
    clock: Clock,
) -> tuple[PaymentReviewResolved, ReviewLookup]:
    """Resolve a flagged payment (see the module doc); returns the recorded resolution.

    Raises `NoSuchPayment`, `IllegalTransition` (not flagged, already terminal, no name or
    reason, an unknown outcome) or `ReviewDisagreesWithGateway` (the gateway's answer does
    not back the outcome and `force` is off). Nothing is recorded when it raises.
    """
    if cmd.outcome not in OUTCOMES:
        raise IllegalTransition(f"outcome must be completed or failed, not {cmd.outcome!r}")
    outcome: ReviewOutcome = "completed" if cmd.outcome == "completed" else "failed"
    async with uow_factory() as uow:
        payment = await uow.find(cmd.payment_id)
    if payment is None:
        raise NoSuchPayment(str(cmd.payment_id))
    # The aggregate refuses these too; checked here so the gateway is not asked in vain.
    if payment.is_terminal:
        raise IllegalTransition(f"payment is already {payment.status}: nothing to resolve")
    if not payment.flagged_for_review:
        raise IllegalTransition("payment is not flagged for review: the service still works on it")
    if not cmd.resolved_by.strip() or not cmd.reason.strip():
        raise IllegalTransition(
            "a review resolution names who resolved it (--by) and why (--reason)"
        )
    found = await look_up(payment, processor)

    async def resolve(uow: UnitOfWork) -> PaymentReviewResolved:
        payment = await uow.load(cmd.payment_id)
        now = clock.now()
        resolution = payment.resolve_review(
            outcome=outcome,
            # Free text from a person: never a card number in a stored event.
            resolved_by=mask_card_numbers(cmd.resolved_by.strip()),
            reason=mask_card_numbers(cmd.reason.strip()),
            gateway_answer=found.answer,
            gateway_reference=found.reference,
            processor=processor.name,
            forced=cmd.force,
            at=now,
        )
        await uow.save(payment)
        await uow.payments.set_status(payment.id, payment.status, now)
        await uow.outbox.add([outcome_message(payment, TraceHeaders())])
        await uow.commit()
        return resolution.resolved

    return await retrying(uow_factory, resolve, "resolve_review"), found
