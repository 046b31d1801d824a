"""Several reconcilers on one PostgreSQL database share a backlog without overlap."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import datetime, timedelta

from payment.adapters.memory import SystemClock
from payment.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from payment.application.batches import request_payments
from payment.application.commands import InboundRef, RequestPayment
from payment.application.handlers import ExecutionPolicy
from payment.application.reconciler import Reconciler
from payment.domain.processor import Approved, ChargeOutcome, ChargeRequest


class Earlier:
    def now(self) -> datetime:
        return SystemClock().now() - timedelta(minutes=10)


class SlowGateway:
    """Nothing charged before; every call takes a few event-loop turns; counts per payment."""

    name = "slow"

    def __init__(self) -> None:
        self.lookups: Counter[uuid.UUID] = Counter()
        self.charges: Counter[uuid.UUID] = Counter()

    async def lookup(self, request: ChargeRequest) -> ChargeOutcome | None:
        self.lookups[request.payment_id] += 1
        await asyncio.sleep(0.005)
        return None

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        self.charges[request.payment_id] += 1
        await asyncio.sleep(0.005)
        return Approved(provider_reference=f"ch_{request.idempotency_key.hex[:12]}")


async def test_three_reconcilers_drain_one_backlog_each_payment_once(
    pg_uow_factory: PostgresUnitOfWorkFactory,
) -> None:
    cmds = [
        RequestPayment(
            inbound=InboundRef(source="saga", message_id=f"m-{n}"),
            booking_id=f"backlog-n{n}",
            amount=1000,
            currency="EUR",
            payment_method="pm_card_visa",
        )
        for n in range(60)
    ]
    await request_payments(cmds, pg_uow_factory, Earlier())
    gateway = SlowGateway()
    reconcilers = [
        Reconciler(
            pg_uow_factory,
            gateway,
            SystemClock(),
            ExecutionPolicy(call_timeout_s=None),
            threshold_s=60,
            interval_s=1,
            parallelism=4,
        )
        for _ in range(3)
    ]

    tried = await asyncio.gather(*(r.run_once() for r in reconcilers))

    assert sum(tried) == 60
    assert all(t > 0 for t in tried), tried
    assert len(gateway.lookups) == 60 and set(gateway.lookups.values()) == {1}
    assert set(gateway.charges.values()) == {1}
    async with pg_uow_factory() as uow:
        assert await uow.payments.in_flight_since(SystemClock().now(), 100) == []
