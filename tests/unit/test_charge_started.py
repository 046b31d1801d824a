"""ChargeStarted, written ahead of every charge, serialises the executor and the reconciler.

Neither records `processor_unavailable` while the other may still be charging, and an
approval can never meet a payment someone else failed.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from test_handlers import POLICY, FakeClock, execute_cmd, initiate, kinds, stream

from payment.adapters.memory import MemoryUnitOfWorkFactory
from payment.application.commands import ReconcilePayment
from payment.application.handlers import ExecuteResult, execute_payment, reconcile_payment
from payment.domain.errors import ChargeInProgress, IllegalTransition
from payment.domain.payment import Payment, PaymentStatus
from payment.domain.processor import (
    Approved,
    ChargeOutcome,
    ChargeRequest,
    ProcessorUnavailable,
)
from support.payments import initiate_payment

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class HeldGateway:
    """The first charge is held until released (then approved); later charges are refused
    as unavailable (nothing charged); lookups find nothing until the held one answers."""

    name = "held"

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.charged: dict[uuid.UUID, ChargeOutcome] = {}
        self.calls = 0

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        self.calls += 1
        if self.calls > 1:
            raise ProcessorUnavailable("503 before charging")
        self.arrived.set()
        await self.release.wait()
        outcome = Approved(provider_reference="ch_held")
        self.charged[request.idempotency_key] = outcome
        return outcome

    async def lookup(self, request: ChargeRequest) -> ChargeOutcome | None:
        return self.charged.get(request.idempotency_key)


# -- the aggregate ---------------------------------------------------------------------


def _payment() -> Payment:
    payment, _ = initiate_payment(at=T0)
    return payment


def test_one_charger_at_a_time_until_its_lease_runs_out_or_it_records_its_attempts() -> None:
    payment = _payment()
    first, second = uuid.uuid4(), uuid.uuid4()
    payment.start_charge(charger=first, at=T0, lease_s=60)

    with pytest.raises(ChargeInProgress):
        payment.start_charge(charger=second, at=T0 + timedelta(seconds=59), lease_s=60)
    payment.start_charge(charger=second, at=T0 + timedelta(seconds=60), lease_s=60)

    payment.record_attempt(processor="p", result="unknown", detail="lost", at=T0)
    assert payment.charge_lease is None  # its attempts are recorded: the lease ends


def test_only_the_sole_charger_may_fail_a_payment_as_unavailable() -> None:
    payment = _payment()
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    payment.start_charge(charger=mine, at=T0, lease_s=1)
    assert payment.may_fail_unavailable(mine)
    payment.start_charge(charger=theirs, at=T0 + timedelta(seconds=2), lease_s=1)

    assert not payment.may_fail_unavailable(mine)
    assert not payment.may_fail_unavailable(theirs)
    with pytest.raises(IllegalTransition):
        payment.fail(reason="processor_unavailable", detail="down", at=T0, charger=theirs)


def test_no_charge_starts_once_the_payment_has_an_outcome() -> None:
    payment = _payment()
    charger = uuid.uuid4()
    payment.start_charge(charger=charger, at=T0, lease_s=60)
    payment.fail(reason="processor_unavailable", detail="down", at=T0, charger=charger)

    with pytest.raises(IllegalTransition):
        payment.start_charge(charger=uuid.uuid4(), at=T0 + timedelta(hours=1), lease_s=60)


# -- the interleavings -----------------------------------------------------------------


async def test_the_reconciler_leaves_alone_a_payment_the_executor_is_charging() -> None:
    uows, clock, gateway = MemoryUnitOfWorkFactory(), FakeClock(), HeldGateway()
    payment_id = await initiate(uows, clock)
    executing = asyncio.create_task(
        execute_payment(execute_cmd(payment_id), uows, gateway, clock, POLICY)
    )
    await gateway.arrived.wait()

    clock.advance(30)  # stale for a reconciler, but within the executor's lease
    reconciled = await reconcile_payment(
        ReconcilePayment(payment_id=payment_id), uows, gateway, clock, POLICY
    )
    assert reconciled is ExecuteResult.BUSY
    assert gateway.calls == 1  # no second charge, no failure recorded
    assert Payment.replay(stream(uows, payment_id)).status is PaymentStatus.INITIATED

    gateway.release.set()
    assert await executing is ExecuteResult.COMPLETED


async def test_an_approval_never_meets_a_payment_another_charger_failed() -> None:
    # The executor's call outlives its lease; the reconciler takes over, finds the gateway
    # refusing every call and no charge by lookup. It must not fail the payment: the
    # executor's request may still reach the gateway, and does, approved.
    uows, clock, gateway = MemoryUnitOfWorkFactory(), FakeClock(), HeldGateway()
    payment_id = await initiate(uows, clock)
    executing = asyncio.create_task(
        execute_payment(execute_cmd(payment_id), uows, gateway, clock, POLICY)
    )
    await gateway.arrived.wait()

    clock.advance(POLICY.charge_lease_s + 1)
    reconciled = await reconcile_payment(
        ReconcilePayment(payment_id=payment_id), uows, gateway, clock, POLICY
    )
    assert reconciled is ExecuteResult.UNKNOWN  # not processor_unavailable
    assert gateway.calls > 1

    gateway.release.set()
    assert await executing is ExecuteResult.COMPLETED
    events = stream(uows, payment_id)
    assert kinds(events)[-1] == "PaymentCompleted"
    assert "PaymentFailed" not in kinds(events)


async def test_the_executor_leaves_alone_a_payment_the_reconciler_is_charging() -> None:
    uows, clock, gateway = MemoryUnitOfWorkFactory(), FakeClock(), HeldGateway()
    payment_id = await initiate(uows, clock)
    clock.advance(120)
    reconciling = asyncio.create_task(
        reconcile_payment(ReconcilePayment(payment_id=payment_id), uows, gateway, clock, POLICY)
    )
    await gateway.arrived.wait()

    # payment.initiated arrives late (consumer lag) while the reconciler charges.
    executed = await execute_payment(execute_cmd(payment_id), uows, gateway, clock, POLICY)
    assert executed is ExecuteResult.BUSY
    assert gateway.calls == 1

    gateway.release.set()
    assert await reconciling is ExecuteResult.COMPLETED
    assert (
        await execute_payment(execute_cmd(payment_id, "again"), uows, gateway, clock, POLICY)
    ) is (ExecuteResult.ALREADY_TERMINAL)
