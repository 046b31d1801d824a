"""Refund handling on PostgreSQL: the refund rules hold under real concurrency."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import msgspec
from psycopg_pool import AsyncConnectionPool

from payment.adapters.memory import SystemClock
from payment.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from payment.adapters.processors.fake import FakeProcessor
from payment.application.commands import ExecutePayment, InboundRef, SettleRefunds
from payment.application.handlers import RequestResult, execute_payment, request_payment
from payment.application.refunds import RefundResult, Refunds
from payment.domain.events import PaymentCompleted
from payment.domain.payment import Payment
from support.commands import SELF, refund_cmd, request_cmd

CHARGE = 12_500


async def _paid(uow: PostgresUnitOfWorkFactory, gateway: FakeProcessor, booking: str) -> Payment:
    clock = SystemClock()
    assert await request_payment(request_cmd(booking), uow, clock) is RequestResult.ACCEPTED
    async with uow() as tx:
        payment_id = await tx.payments.payment_for_booking(booking)
    assert payment_id is not None
    inbound = InboundRef(source=SELF, message_id=str(uuid.uuid4()))
    await execute_payment(
        ExecutePayment(inbound=inbound, payment_id=payment_id), uow, gateway, clock
    )
    async with uow() as tx:
        return Payment.replay(await tx.events.load(payment_id))


async def _published(pool: AsyncConnectionPool, kind: str) -> list[dict[str, object]]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT data FROM payment_outbox WHERE type = %s", (kind,))
        return [msgspec.json.decode(bytes(data)) for (data,) in await cur.fetchall()]


async def test_fifteen_concurrent_refunds_of_a_tenth_make_exactly_ten(
    pg_uow_factory: PostgresUnitOfWorkFactory, pg_pool: AsyncConnectionPool
) -> None:
    gateway = FakeProcessor(latency_ms=2)
    payment = await _paid(pg_uow_factory, gateway, "BK-concurrent")
    refunds = Refunds(pg_uow_factory, gateway, SystemClock())

    async def one() -> RefundResult:
        result, payment_id = await refunds.request(refund_cmd("BK-concurrent", amount=CHARGE // 10))
        if result is RefundResult.ACCEPTED:
            assert payment_id is not None
            await refunds.settle(SettleRefunds(payment_id=payment_id))
        return result

    results = await asyncio.gather(*(one() for _ in range(15)))
    assert results.count(RefundResult.ACCEPTED) == 10
    assert results.count(RefundResult.REFUSED) == 5
    refunded = await _published(pg_pool, "payment.refunded")
    assert len(refunded) == 10
    assert max(int(str(m["refunded_total"])) for m in refunded) == CHARGE
    refused = await _published(pg_pool, "payment.refund_failed")
    assert [m["reason"] for m in refused] == ["over_refund"] * 5
    assert isinstance(payment.outcome, PaymentCompleted)
    assert gateway.refunded(payment.outcome.provider_reference) == CHARGE
    async with pg_uow_factory() as tx:
        after = Payment.replay(await tx.events.load(payment.id))
        assert await tx.payments.refunds_due(datetime.now(UTC), 10) == []
    assert after.refunded_total == CHARGE and after.pending_refunds == []


async def test_a_refund_racing_the_first_payment_request_either_refunds_or_cancels(
    pg_uow_factory: PostgresUnitOfWorkFactory, pg_pool: AsyncConnectionPool
) -> None:
    clock = SystemClock()
    refunds = Refunds(pg_uow_factory, FakeProcessor(), clock)
    for i in range(10):
        booking = f"BK-race-{i}"
        request, (refund, _) = await asyncio.gather(
            request_payment(request_cmd(booking), pg_uow_factory, clock),
            refunds.request(refund_cmd(booking)),
        )
        # Either the payment came first (the refund is recorded against it) or the refund
        # closed the booking (the request is answered `cancelled`, nothing created).
        assert (request, refund) in (
            (RequestResult.ACCEPTED, RefundResult.ACCEPTED),
            (RequestResult.CANCELLED, RefundResult.CLOSED),
        )
    failed = await _published(pg_pool, "payment.failed")
    assert all(m["reason"] == "cancelled" for m in failed)
