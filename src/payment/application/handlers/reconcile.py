"""Reconciliation: a payment left in flight is looked up at the gateway, charged again only
when the gateway holds no charge for it, and flagged for a human once it stays unknown."""

from __future__ import annotations

import uuid

from payment.application.commands import ReconcilePayment
from payment.application.conflicts import retrying
from payment.application.gateway import ChargeGateway, Exchange, ExecutionPolicy
from payment.application.handlers.execute import charge_and_record, start_charge
from payment.application.handlers.outcome import record_outcome
from payment.application.handlers.results import ExecuteResult
from payment.application.ports import Clock, UnitOfWork, UnitOfWorkFactory
from payment.domain.payment import Payment, PaymentStatus
from payment.domain.processor import Approved, Declined, OutcomeUnknown, PaymentProcessor


async def reconcile_payment(
    cmd: ReconcilePayment,
    uow_factory: UnitOfWorkFactory,
    processor: PaymentProcessor,
    clock: Clock,
    policy: ExecutionPolicy = ExecutionPolicy(),
) -> ExecuteResult:
    """Resolve a payment left in flight: look it up at the gateway; if the gateway holds
    no charge for it, charge again (same key).

    Only the gateway's "no such charge" leads to a charge. A charge it reports as still
    in progress is waited for, and so is an answer it cannot give now (unreachable, no
    answer in time): nothing is charged or recorded meanwhile (once the gateway's
    idempotency window has passed, a new charge would take the money twice), and the
    payment goes to the back of the queue. A payment still unknown past
    `policy.review_after_s` is flagged for review, once; it is never failed blindly.
    """
    gateway = ChargeGateway(processor, policy, clock)
    async with uow_factory() as uow:
        payment = await uow.find(cmd.payment_id)
    if payment is None:
        return ExecuteResult.NOT_FOUND
    if payment.is_terminal:
        return ExecuteResult.ALREADY_TERMINAL
    known = await gateway.look_up(payment)
    if isinstance(known, Approved | Declined):
        exchange = Exchange([("lookup", known)], known)
        return await record_outcome(uow_factory, gateway, payment.id, exchange, None, cmd.trace)
    if isinstance(known, OutcomeUnknown):
        started: tuple[Payment, uuid.UUID] | ExecuteResult = ExecuteResult.UNKNOWN
    else:
        started = await start_charge(payment, uow_factory, gateway)
    if started is ExecuteResult.ALREADY_TERMINAL:
        return started
    if isinstance(started, ExecuteResult):
        # The gateway cannot say now (or the charge is still in progress), or another
        # caller is charging: nothing to record, but to the back of the reconciler's
        # queue all the same (as an unknown attempt is), so that payments the gateway
        # cannot settle now do not starve others.
        async with uow_factory() as uow:
            await uow.payments.requeue(payment.id, clock.now())
            await uow.commit()
        result: ExecuteResult = started
    else:
        payment, charger = started
        result = await charge_and_record(uow_factory, gateway, payment, charger, None, cmd.trace)
    if result is ExecuteResult.UNKNOWN:
        age = gateway.age(payment)
        if age >= policy.review_after_s and not payment.flagged_for_review:
            return await _flag(payment.id, uow_factory, clock, age)
    return result


async def _flag(
    payment_id: uuid.UUID, uow_factory: UnitOfWorkFactory, clock: Clock, age: float
) -> ExecuteResult:
    async def flag(uow: UnitOfWork) -> ExecuteResult:
        payment = await uow.load(payment_id)
        if payment.is_terminal or payment.flagged_for_review:
            return ExecuteResult.ALREADY_TERMINAL
        now = clock.now()
        payment.flag_for_review(
            detail=f"outcome unknown for {age:.0f}s: needs manual review", at=now
        )
        await uow.save(payment)
        await uow.payments.set_status(payment_id, PaymentStatus.INITIATED, now)
        await uow.commit()
        return ExecuteResult.FLAGGED

    return await retrying(uow_factory, flag, "flag_for_review")
