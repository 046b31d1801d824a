"""Batch handlers: many messages of one kind in one transaction, each as its own handler would.

A consumer batch of requests (or of initiated events) costs a handful of statements in
one transaction instead of a handful per message. The outcome of every message is what
`request_payment` / `execute_payment` would have given it, and the guarantees are the
same: a message's inbox mark, its events and its outbox rows still commit together (with
those of the other messages of the batch, all or nothing).

Whatever the fast path does not cover goes through the single-message handlers instead:
a second message of the same booking, payment or (source, id) in one batch; a booking
that already has a payment (a re-request: it must be compared, replayed or refused); a
request that breaks a rule (its booking may have a payment: contract 4.3); a lost race
with a concurrent writer. The batch transaction is then abandoned, not committed, so
nothing of it counts twice.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

from payment.application import failpoints
from payment.application.commands import ExecutePayment, RequestPayment
from payment.application.errors import RETRYABLE_CONFLICTS, PaymentConflict
from payment.application.gateway import ChargeGateway, Exchange, ExecutionPolicy
from payment.application.handlers.execute import execute_payment, mark_handled
from payment.application.handlers.outcome import apply_outcome, record_outcome, status_of
from payment.application.handlers.request import (
    RequestPolicy,
    initiate_for,
    rejection_for,
    request_payment,
)
from payment.application.handlers.results import ExecuteResult, RequestResult
from payment.application.messages import OutboundMessage, initiated_message
from payment.application.ports import Clock, UnitOfWorkFactory
from payment.application.validation import Valid, validate_request, well_formed_booking_id
from payment.domain.errors import ChargeInProgress
from payment.domain.payment import Payment, PaymentStatus
from payment.domain.processor import PaymentProcessor

RequestOutcome = RequestResult | PaymentConflict

# Entered around one command's gateway calls, and around the whole handling of a command
# that goes one by one (where an adapter makes that message's trace current).
ChargeScope = Callable[[ExecutePayment], AbstractContextManager[object]]


def _no_scope(cmd: ExecutePayment) -> AbstractContextManager[object]:
    return nullcontext()


def _split(keys: Sequence[tuple[object, ...]]) -> tuple[list[int], list[int]]:
    """Indexes whose every key is new in the batch, and the others (for one by one, after)."""
    seen: set[object] = set()
    first: list[int] = []
    again: list[int] = []
    for i, item in enumerate(keys):
        if any(k in seen for k in item):
            again.append(i)
        else:
            seen.update(item)
            first.append(i)
    return first, again


# -- requests ------------------------------------------------------------------------------


async def request_payments(
    cmds: Sequence[RequestPayment],
    uow_factory: UnitOfWorkFactory,
    clock: Clock,
    request_policy: RequestPolicy = RequestPolicy(),
) -> list[RequestOutcome]:
    """`request_payment` for each command; one transaction for the batch when it can.

    Returns each command's result in order; a command `request_payment` would raise
    `PaymentConflict` for gets that exception as its result (the caller dead-letters it).
    """
    results: dict[int, RequestOutcome] = {}
    batch, single = _split(
        [(("m", c.inbound.source, c.inbound.message_id), ("b", c.booking_id)) for c in cmds]
    )
    checked = {i: validate_request(cmds[i], max_amount=request_policy.max_amount) for i in batch}
    # A request that breaks a rule may be a re-request for a booking that has a payment
    # (then dead-lettered, not refused): rare enough to go one by one, where it is looked
    # up. One whose booking id itself breaks the rules can have no payment.
    lookup = {
        i
        for i in batch
        if isinstance(checked[i], str) and well_formed_booking_id(cmds[i].booking_id)
    }
    single += sorted(lookup)
    batch = [i for i in batch if i not in lookup]
    if batch:
        try:
            await _request_batch(cmds, batch, checked, uow_factory, clock, results, expect_new=True)
            batch = []
        except RETRYABLE_CONFLICTS:
            pass  # a duplicate, a booking that has a payment, a lost race: the careful way
    for _ in range(2):
        if not batch:
            break
        try:
            taken = await _request_batch(cmds, batch, checked, uow_factory, clock, results)
        except RETRYABLE_CONFLICTS:
            taken = None
        if taken is None:
            break  # lost a race: everything one by one
        if not taken:
            batch = []
            break
        # Bookings that already have a payment: those one by one, the rest again.
        single += taken
        batch = [i for i in batch if i not in set(taken)]
    single += batch
    for i in sorted(single):
        try:
            # Each is a duplicate, a re-request or a lost race: no optimistic first try.
            results[i] = await request_payment(
                cmds[i], uow_factory, clock, request_policy, careful=True
            )
        except PaymentConflict as exc:
            results[i] = exc
    return [results[i] for i in range(len(cmds))]


async def _request_batch(
    cmds: Sequence[RequestPayment],
    batch: Sequence[int],
    checked: dict[int, Valid | str],
    uow_factory: UnitOfWorkFactory,
    clock: Clock,
    results: dict[int, RequestOutcome],
    *,
    expect_new: bool = False,
) -> list[int]:
    """One transaction for `batch`; the indexes whose booking was taken (then nothing is
    committed and `results` is left alone).

    `expect_new`: the common case, every message new and every booking free, with nothing
    to read first, so the unit of work goes in one message (the careful way reads the
    inbox and the claims first: three). Anything else fails it (`DuplicateMessage`,
    `BookingAlreadyClaimed`) and nothing of it is kept.
    """
    async with uow_factory() as uow:
        now = clock.now()
        keys = [(cmds[i].inbound.source, cmds[i].inbound.message_id) for i in batch]
        if expect_new:
            await uow.inbox.mark_new(keys, now)
            fresh = set(keys)
        else:
            fresh = await uow.inbox.mark_many(keys, now)
        failpoints.hit("after_inbox_insert")
        outcomes: dict[int, RequestResult] = {}
        initiated: dict[int, Payment] = {}
        messages: dict[int, OutboundMessage] = {}
        for i in batch:
            cmd = cmds[i]
            valid = checked[i]
            if (cmd.inbound.source, cmd.inbound.message_id) not in fresh:
                outcomes[i] = RequestResult.DUPLICATE
            elif isinstance(valid, str):
                outcomes[i] = RequestResult.REJECTED
                messages[i] = rejection_for(cmd, valid, now)
            else:
                initiated[i] = initiate_for(cmd, valid, now)
                outcomes[i] = RequestResult.ACCEPTED
                messages[i] = initiated_message(initiated[i], cmd.trace)
        if initiated:
            claims = [(cmds[i].booking_id, payment.id) for i, payment in initiated.items()]
            if expect_new:
                await uow.payments.claim_free_bookings(claims, now)
            else:
                claimed = await uow.payments.claim_bookings(claims, now)
                taken = [i for i in initiated if cmds[i].booking_id not in claimed]
                if taken:
                    return taken  # leaving without commit rolls the batch back
            await uow.save_all(list(initiated.values()))
        await uow.outbox.add([messages[i] for i in sorted(messages)])
        await uow.commit()
    if initiated:
        failpoints.hit("after_initiated_commit")
    results.update(outcomes)
    return []


# -- executions ----------------------------------------------------------------------------


async def execute_payments(
    cmds: Sequence[ExecutePayment],
    uow_factory: UnitOfWorkFactory,
    processor: PaymentProcessor,
    clock: Clock,
    policy: ExecutionPolicy = ExecutionPolicy(),
    scope: ChargeScope | None = None,
) -> list[ExecuteResult]:
    """`execute_payment` for each command: one read for the batch, charges concurrently,
    outcomes recorded together.

    Outcomes are written in waves: whatever charges have finished when the previous write
    ends go in the next transaction, so a slow gateway call holds back only itself. Each
    payment's outcome is appended after the version read before its charge (no second
    read); the optimistic lock refuses it if anyone wrote meanwhile, and that wave is then
    recorded one message at a time, reading afresh.
    """
    enter = scope or _no_scope
    gateway = ChargeGateway(processor, policy, clock)
    results: dict[int, ExecuteResult] = {}
    batch, single = _split(
        [(("m", c.inbound.source, c.inbound.message_id), ("p", c.payment_id)) for c in cmds]
    )
    if batch:
        async with uow_factory() as uow:
            streams = await uow.events.load_many([cmds[i].payment_id for i in batch])
        mark_only: list[int] = []
        to_charge: dict[int, Payment] = {}
        for i in batch:
            events = streams.get(cmds[i].payment_id)
            payment = Payment.replay(events) if events else None
            if payment is None or payment.is_terminal:
                results[i] = (
                    ExecuteResult.NOT_FOUND if payment is None else ExecuteResult.ALREADY_TERMINAL
                )
                mark_only.append(i)
            else:
                to_charge[i] = payment
        chargers = await _start_charges(to_charge, uow_factory, gateway)
        if chargers is None:  # lost a race: each of them one by one, reading afresh
            single += list(to_charge)
            chargers = {}
        for i in to_charge:
            if i not in single and i not in chargers:
                # Another executor or reconciler is charging it and records the outcome.
                results[i] = ExecuteResult.BUSY
                mark_only.append(i)
        charges: dict[asyncio.Task[Exchange], tuple[int, Payment]] = {}
        for i, charger in chargers.items():
            task = asyncio.create_task(_charge_in(enter(cmds[i]), gateway, to_charge[i], charger))
            charges[task] = (i, to_charge[i])
        try:
            await _record_in_waves(cmds, charges, mark_only, uow_factory, gateway, results)
        finally:
            for task in charges:
                task.cancel()
    for i in single:
        with enter(cmds[i]):
            results[i] = await execute_payment(cmds[i], uow_factory, processor, clock, policy)
    return [results[i] for i in range(len(cmds))]


async def _start_charges(
    payments: dict[int, Payment], uow_factory: UnitOfWorkFactory, gateway: ChargeGateway
) -> dict[int, uuid.UUID] | None:
    """`start_charge` for a batch in one transaction: the chargers of those that may be
    charged now (the others are another charger's); None if the optimistic lock refused."""
    chargers: dict[int, uuid.UUID] = {}
    now = gateway.clock.now()
    for i, payment in payments.items():
        charger = uuid.uuid4()
        try:
            payment.start_charge(charger=charger, at=now, lease_s=gateway.policy.charge_lease_s)
        except ChargeInProgress:
            continue
        chargers[i] = charger
    if not chargers:
        return chargers
    try:
        async with uow_factory() as uow:
            await uow.save_all([payments[i] for i in chargers])
            await uow.commit()
    except RETRYABLE_CONFLICTS:
        return None
    return chargers


async def _charge_in(
    scope: AbstractContextManager[object],
    gateway: ChargeGateway,
    payment: Payment,
    charger: uuid.UUID,
) -> Exchange:
    with scope:
        return await gateway.charge(payment, charger)


async def _record_in_waves(
    cmds: Sequence[ExecutePayment],
    charges: dict[asyncio.Task[Exchange], tuple[int, Payment]],
    mark_only: list[int],
    uow_factory: UnitOfWorkFactory,
    gateway: ChargeGateway,
    results: dict[int, ExecuteResult],
) -> None:
    pending: set[asyncio.Task[Exchange]] = set(charges)
    marks = mark_only
    while pending or marks:
        done: set[asyncio.Task[Exchange]] = set()
        if pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        wave = sorted(((*charges[t], t.result()) for t in done), key=lambda item: item[0])
        try:
            await _record_wave(cmds, wave, marks, uow_factory, gateway, results)
        except RETRYABLE_CONFLICTS:
            # One of them was handled before (or a race was lost): no optimistic first try.
            for i, payment, exchange in wave:
                cmd = cmds[i]
                results[i] = await record_outcome(
                    uow_factory,
                    gateway,
                    payment.id,
                    exchange,
                    cmd.inbound,
                    cmd.trace,
                    careful=True,
                )
            for i in marks:
                await mark_handled(uow_factory, cmds[i].inbound, gateway.clock)
        marks = []


async def _record_wave(
    cmds: Sequence[ExecutePayment],
    wave: Sequence[tuple[int, Payment, Exchange]],
    marks: Sequence[int],
    uow_factory: UnitOfWorkFactory,
    gateway: ChargeGateway,
    results: dict[int, ExecuteResult],
) -> None:
    async with uow_factory() as uow:
        now = gateway.clock.now()
        # Messages that only need marking are mostly redeliveries (a payment already
        # finished): marked the careful way. Those of charges rarely are (after a crash):
        # expecting none lets the wave go in one message; one fails the wave, which is then
        # recorded one by one, where it shows as a duplicate.
        if marks:
            await uow.inbox.mark_many(
                [(cmds[i].inbound.source, cmds[i].inbound.message_id) for i in marks], now
            )
        await uow.inbox.mark_new(
            [(cmds[i].inbound.source, cmds[i].inbound.message_id) for i, *_ in wave], now
        )
        outcomes: dict[int, ExecuteResult] = {}
        statuses: list[tuple[uuid.UUID, PaymentStatus]] = []
        messages: list[OutboundMessage] = []
        for i, payment, exchange in wave:
            cmd = cmds[i]
            outcomes[i], message = apply_outcome(payment, exchange, gateway.name, now, cmd.trace)
            statuses.append((payment.id, status_of(payment)))
            if message is not None:
                messages.append(message)
        await uow.save_all([payment for _, payment, _ in wave])
        await uow.payments.set_statuses(statuses, now)
        await uow.outbox.add(messages)
        if messages:
            failpoints.hit("before_terminal_commit")
        await uow.commit()
    if messages:
        failpoints.hit("after_terminal_commit")
    results.update(outcomes)


__all__: Sequence[str] = ["ChargeScope", "RequestOutcome", "execute_payments", "request_payments"]
