"""`payment.initiated`: charge the payment once per idempotency key, record the outcome."""

from __future__ import annotations

import uuid

from payment.application.commands import ExecutePayment, InboundRef, TraceHeaders
from payment.application.conflicts import loaded_once, retrying
from payment.application.gateway import ChargeGateway, ExecutionPolicy
from payment.application.handlers.outcome import record_outcome
from payment.application.handlers.results import ExecuteResult
from payment.application.ports import Clock, UnitOfWork, UnitOfWorkFactory
from payment.domain.errors import ChargeInProgress
from payment.domain.payment import Payment
from payment.domain.processor import PaymentProcessor


async def execute_payment(
    cmd: ExecutePayment,
    uow_factory: UnitOfWorkFactory,
    processor: PaymentProcessor,
    clock: Clock,
    policy: ExecutionPolicy = ExecutionPolicy(),
) -> ExecuteResult:
    """Handle `payment.initiated`: charge once per idempotency key, record the outcome.

    No transaction is held open during the gateway call; the gateway's idempotency makes
    a second concurrent execution of the same payment harmless, and the optimistic lock
    lets exactly one of them record the outcome.
    """
    gateway = ChargeGateway(processor, policy, clock)
    async with uow_factory() as uow:
        payment = await uow.find(cmd.payment_id)
    if payment is None:
        started: tuple[Payment, uuid.UUID] | ExecuteResult = ExecuteResult.NOT_FOUND
    elif payment.is_terminal:
        started = ExecuteResult.ALREADY_TERMINAL
    else:
        started = await start_charge(payment, uow_factory, gateway)
    if isinstance(started, ExecuteResult):
        # No such payment, finished meanwhile, or another executor or reconciler is
        # charging it (that one records the outcome): the message is handled.
        await mark_handled(uow_factory, cmd.inbound, clock)
        return started
    return await charge_and_record(uow_factory, gateway, *started, cmd.inbound, cmd.trace)


async def start_charge(
    payment: Payment, uow_factory: UnitOfWorkFactory, gateway: ChargeGateway
) -> tuple[Payment, uuid.UUID] | ExecuteResult:
    """Write ahead that a new charger is about to call the gateway (`ChargeStarted`).

    Returns the payment as it now is and the charger's id; or ALREADY_TERMINAL, or
    BUSY when another charger's lease runs (that one records the outcome). Committed
    before the call, so executors and reconcilers of every instance see it: see
    docs/adr/0004-charge-started.md.
    """
    charger = uuid.uuid4()
    current = loaded_once(payment.id, payment)

    async def start(uow: UnitOfWork) -> tuple[Payment, uuid.UUID] | ExecuteResult:
        payment = await current(uow)
        if payment.is_terminal:
            return ExecuteResult.ALREADY_TERMINAL
        try:
            payment.start_charge(
                charger=charger, at=gateway.clock.now(), lease_s=gateway.policy.charge_lease_s
            )
        except ChargeInProgress:
            return ExecuteResult.BUSY
        await uow.save(payment)
        await uow.commit()
        return payment, charger

    return await retrying(uow_factory, start, "start_charge")


async def charge_and_record(
    uow_factory: UnitOfWorkFactory,
    gateway: ChargeGateway,
    payment: Payment,
    charger: uuid.UUID,
    inbound: InboundRef | None,
    trace: TraceHeaders,
) -> ExecuteResult:
    """Charge `payment` as `charger` (its ChargeStarted committed), then record the outcome."""
    exchange = await gateway.charge(payment, charger)
    return await record_outcome(uow_factory, gateway, payment.id, exchange, inbound, trace, payment)


async def mark_handled(uow_factory: UnitOfWorkFactory, inbound: InboundRef, clock: Clock) -> None:
    """Mark a message handled that changes nothing else (its own transaction)."""
    async with uow_factory() as uow:
        if await uow.inbox.mark(inbound.source, inbound.message_id, clock.now()):
            await uow.commit()
