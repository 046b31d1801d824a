"""`saga.request_payment`: the booking's one payment is initiated, or the request answered."""

from __future__ import annotations

import uuid
from datetime import datetime

import msgspec

from payment.application import failpoints
from payment.application.commands import RequestPayment
from payment.application.conflicts import retrying
from payment.application.errors import (
    RETRYABLE_CONFLICTS,
    BookingAlreadyClaimed,
    PaymentConflict,
)
from payment.application.handlers.results import RequestResult
from payment.application.messages import (
    OutboundMessage,
    cancelled_message,
    initiated_message,
    outcome_message,
    rejection_message,
)
from payment.application.ports import Clock, UnitOfWork, UnitOfWorkFactory
from payment.application.validation import Valid, validate_request, well_formed_booking_id
from payment.domain.ids import new_id
from payment.domain.money import DEFAULT_MAX_AMOUNT
from payment.domain.payment import Payment


class RequestPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """What a payment request must respect to be accepted (PAYMENT_MAX_AMOUNT)."""

    max_amount: int = DEFAULT_MAX_AMOUNT


async def request_payment(
    cmd: RequestPayment,
    uow_factory: UnitOfWorkFactory,
    clock: Clock,
    request_policy: RequestPolicy = RequestPolicy(),
    *,
    careful: bool = False,
) -> RequestResult:
    """Handle `saga.request_payment` (contract sections 3-4).

    Raises `PaymentConflict` for a re-request whose amount or currency differs from the
    booking's payment, or that breaks a rule of section 3: the caller dead-letters it.
    A valid request is first tried as new (`_request_new`), unless `careful` (the caller
    knows it is likely a duplicate or a re-request).
    """
    checked = validate_request(cmd, max_amount=request_policy.max_amount)
    if not isinstance(checked, str) and not careful:
        try:
            return await _request_new(cmd, checked, uow_factory, clock)
        except RETRYABLE_CONFLICTS:
            pass  # a duplicate, a booking that has a payment, a lost race: as below

    async def handle(uow: UnitOfWork) -> RequestResult:
        if not await uow.inbox.mark(cmd.inbound.source, cmd.inbound.message_id, clock.now()):
            return RequestResult.DUPLICATE
        failpoints.hit("after_inbox_insert")
        result = await _request_in(uow, cmd, checked, clock.now())
        await uow.commit()
        if result is RequestResult.ACCEPTED:
            failpoints.hit("after_initiated_commit")
        return result

    # A lost race (for the booking, say): a fresh transaction sees the winner.
    return await retrying(uow_factory, handle, "request_payment")


async def _request_new(
    cmd: RequestPayment, checked: Valid, uow_factory: UnitOfWorkFactory, clock: Clock
) -> RequestResult:
    """The common case, a new message for a free booking, with nothing to read first: the
    unit of work goes in one message. Anything else fails it (`DuplicateMessage`,
    `BookingAlreadyClaimed`) and nothing of it is kept; the caller then takes the careful
    way, which reads and answers duplicates and re-requests."""
    async with uow_factory() as uow:
        now = clock.now()
        await uow.inbox.mark_new([(cmd.inbound.source, cmd.inbound.message_id)], now)
        failpoints.hit("after_inbox_insert")
        payment = initiate_for(cmd, checked, now)
        await uow.payments.claim_free_bookings([(cmd.booking_id, payment.id)], now)
        await uow.save(payment)
        await uow.outbox.add([initiated_message(payment, cmd.trace)])
        await uow.commit()
    failpoints.hit("after_initiated_commit")
    return RequestResult.ACCEPTED


async def _request_in(
    uow: UnitOfWork, cmd: RequestPayment, checked: Valid | str, now: datetime
) -> RequestResult:
    if isinstance(checked, str):
        await refuse_if_booking_has_payment(uow, cmd, checked)
        await uow.outbox.add([rejection_for(cmd, checked, now)])
        return RequestResult.REJECTED
    payment = initiate_for(cmd, checked, now)
    # Claim first: a new booking (the common case) then costs no lookup. The claim leaves
    # the transaction usable when the booking is taken, so the existing payment is read
    # in it; a claim refused only at commit retries the whole handling.
    try:
        await uow.payments.claim_booking(cmd.booking_id, payment.id, now)
    except BookingAlreadyClaimed:
        existing_id = await uow.payments.payment_for_booking(cmd.booking_id)
        if existing_id is not None:
            return await _existing_payment(uow, cmd, checked, existing_id)
        if not await uow.payments.booking_closed(cmd.booking_id):
            raise  # its claimer rolled back meanwhile: retry from the start
        # A refund overtook this request and closed the booking (contract 4.8).
        cancelled = cancelled_message(
            booking_id=cmd.booking_id, saga_id=cmd.saga_id, at=now, trace=cmd.trace
        )
        await uow.outbox.add([cancelled])
        return RequestResult.CANCELLED
    await uow.save(payment)
    await uow.outbox.add([initiated_message(payment, cmd.trace)])
    return RequestResult.ACCEPTED


async def refuse_if_booking_has_payment(uow: UnitOfWork, cmd: RequestPayment, broken: str) -> None:
    """Raise `PaymentConflict` if the booking of a request that breaks rule `broken`
    already has a payment (contract 4.3): the caller dead-letters the request, and the
    booking gets no `payment.failed` it did not earn."""
    if not well_formed_booking_id(cmd.booking_id):
        return  # no payment was ever made for a booking id that breaks the rules
    existing_id = await uow.payments.payment_for_booking(cmd.booking_id)
    if existing_id is not None:
        raise PaymentConflict(
            existing_id, f"re-request for a booking that has a payment breaks a rule: {broken}"
        )


async def _existing_payment(
    uow: UnitOfWork, cmd: RequestPayment, checked: Valid, existing_id: uuid.UUID
) -> RequestResult:
    """A valid request for a booking that already has a payment (contract 4.3)."""
    existing = await uow.load(existing_id)
    if existing.money != checked.money:
        raise PaymentConflict(
            existing.id,
            "re-request differs in amount or currency from the booking's payment",
        )
    if existing.is_terminal:
        await uow.outbox.add([outcome_message(existing, cmd.trace)])
        return RequestResult.REPLAYED
    return RequestResult.IN_FLIGHT


# -- steps shared with the batch handlers (batches.py) ----------------------------------


def rejection_for(cmd: RequestPayment, detail: str, at: datetime) -> OutboundMessage:
    """`payment.failed` / `invalid_request` for a request refused with `detail` (no payment)."""
    return rejection_message(
        booking_id=cmd.booking_id, saga_id=cmd.saga_id, detail=detail, at=at, trace=cmd.trace
    )


def initiate_for(cmd: RequestPayment, checked: Valid, at: datetime) -> Payment:
    """A new payment for a valid request (its PaymentInitiated not saved yet)."""
    payment, _ = Payment.initiate(
        payment_id=new_id(),
        booking_id=cmd.booking_id,
        money=checked.money,
        payment_method=checked.payment_method,
        saga_id=checked.saga_id,
        customer_id=checked.customer_id,
        at=at,
    )
    return payment
