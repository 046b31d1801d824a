"""The reconciler works a backlog in parallel, oldest first; instances share it without overlap.

One payment's error is its own (the others are reconciled, the error counted); a round
that fails as a whole is followed by the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import psycopg

from payment.adapters.memory import MemoryUnitOfWork, MemoryUnitOfWorkFactory
from payment.application.handlers import ExecutionPolicy, request_payment
from payment.application.reconciler import Reconciler
from payment.domain.payment import Payment
from payment.domain.processor import (
    Approved,
    ChargeOutcome,
    ChargeRequest,
    OutcomeUnknown,
)
from support.commands import request_cmd
from support.waiting import eventually

POLICY = ExecutionPolicy(call_timeout_s=None, max_attempts=1)


class FakeClock:
    def __init__(self) -> None:
        self.current = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.current


class CountingGateway:
    """Charged nothing before; counts lookups per payment and calls in flight."""

    name = "counting"

    def __init__(self, *, unknown: bool = False) -> None:
        self.unknown = unknown
        self.lookups: Counter[uuid.UUID] = Counter()
        self.order: list[uuid.UUID] = []
        self.charges: Counter[uuid.UUID] = Counter()
        self.in_flight = 0
        self.high_water = 0

    async def _busy(self) -> None:
        self.in_flight += 1
        self.high_water = max(self.high_water, self.in_flight)
        for _ in range(3):  # let the other reconciliations run meanwhile
            await asyncio.sleep(0)
        self.in_flight -= 1

    async def lookup(self, request: ChargeRequest) -> ChargeOutcome | None:
        self.lookups[request.payment_id] += 1
        self.order.append(request.payment_id)
        await self._busy()
        if self.unknown:
            raise OutcomeUnknown("still no answer")
        return None

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        self.charges[request.payment_id] += 1
        await self._busy()
        return Approved(provider_reference=f"ch_{request.payment_id.hex[:8]}")


async def _backlog(uows: MemoryUnitOfWorkFactory, clock: FakeClock, n: int) -> list[uuid.UUID]:
    """`n` payments in flight, initiated one second apart (oldest first)."""
    for i in range(n):
        await request_payment(request_cmd(f"bk-{i:05d}"), uows, clock)
        clock.current += timedelta(seconds=1)
    clock.current += timedelta(seconds=600)
    ids = list(uows.db.streams)
    return sorted(ids, key=lambda pid: uows.db.streams[pid][0].occurred_at)


def _reconciler(
    uows: MemoryUnitOfWorkFactory, gateway: CountingGateway, clock: FakeClock, parallelism: int
) -> Reconciler:
    return Reconciler(
        uows, gateway, clock, POLICY, threshold_s=60, interval_s=1, parallelism=parallelism
    )


async def test_a_backlog_is_worked_in_parallel_oldest_first_until_none_is_left() -> None:
    uows, clock, gateway = MemoryUnitOfWorkFactory(), FakeClock(), CountingGateway()
    ids = await _backlog(uows, clock, 40)
    reconciler = _reconciler(uows, gateway, clock, parallelism=6)

    assert await reconciler.run_once() == 40

    assert reconciler.actions == {"completed": 40}
    assert reconciler.most_running == 6
    assert gateway.high_water == 6
    assert set(gateway.order[:6]) == set(ids[:6])  # the oldest went first
    assert all(Payment.replay(uows.db.streams[pid]).is_terminal for pid in ids)
    assert set(gateway.charges.values()) == {1}


async def test_two_instances_share_a_backlog_without_reconciling_a_payment_twice() -> None:
    uows, clock, gateway = MemoryUnitOfWorkFactory(), FakeClock(), CountingGateway()
    ids = await _backlog(uows, clock, 30)
    first = _reconciler(uows, gateway, clock, parallelism=4)
    second = _reconciler(uows, gateway, clock, parallelism=4)

    tried = await asyncio.gather(first.run_once(), second.run_once())

    assert sum(tried) == 30
    assert min(tried) > 0  # both took part
    assert set(gateway.lookups) == set(ids)
    assert set(gateway.lookups.values()) == {1}
    assert set(gateway.charges.values()) == {1}


async def test_payments_still_unknown_end_the_round_and_wait_for_the_next() -> None:
    uows, clock, gateway = MemoryUnitOfWorkFactory(), FakeClock(), CountingGateway(unknown=True)
    await _backlog(uows, clock, 5)
    reconciler = _reconciler(uows, gateway, clock, parallelism=3)

    assert await reconciler.run_once() == 5
    assert await reconciler.run_once() == 0  # leased: not stale again yet

    clock.current += timedelta(seconds=61)
    assert await reconciler.run_once() == 5
    assert set(gateway.lookups.values()) == {2}
    assert not gateway.charges


class OneLookupBreaks(CountingGateway):
    """The gateway's client fails on one payment's lookup only (a bug, a bad answer)."""

    def __init__(self, broken: uuid.UUID) -> None:
        super().__init__()
        self.broken = broken

    async def lookup(self, request: ChargeRequest) -> ChargeOutcome | None:
        if request.payment_id == self.broken:
            self.lookups[request.payment_id] += 1
            raise ValueError("unparseable answer from the gateway")
        return await super().lookup(request)


async def test_one_payments_error_is_counted_and_the_others_are_reconciled() -> None:
    uows, clock = MemoryUnitOfWorkFactory(), FakeClock()
    ids = await _backlog(uows, clock, 4)
    gateway = OneLookupBreaks(broken=ids[1])
    reconciler = _reconciler(uows, gateway, clock, parallelism=2)

    assert await reconciler.run_once() == 4

    assert reconciler.actions == {"completed": 3, "error": 1}
    assert gateway.lookups[ids[1]] == 1
    assert not Payment.replay(uows.db.streams[ids[1]]).is_terminal
    assert all(Payment.replay(uows.db.streams[pid]).is_terminal for pid in ids if pid != ids[1])


class FirstClaimFails(MemoryUnitOfWorkFactory):
    """The database drops the connection under the first round's claim, then recovers."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def __call__(self) -> MemoryUnitOfWork:
        uow = super().__call__()
        if not self.failed:
            self.failed = True

            async def lost(before: datetime, limit: int, at: datetime) -> list[uuid.UUID]:
                raise psycopg.OperationalError("server closed the connection unexpectedly")

            uow.payments.claim_stale = lost  # type: ignore[method-assign]
        return uow


async def test_a_failed_round_is_counted_and_the_next_round_reconciles() -> None:
    uows, clock, gateway = FirstClaimFails(), FakeClock(), CountingGateway()
    ids = await _backlog(uows, clock, 3)
    uows.failed = False  # the backlog is written; the reconciler's first claim fails
    reconciler = Reconciler(uows, gateway, clock, POLICY, threshold_s=60, interval_s=0.01)

    running = asyncio.create_task(reconciler.run())
    try:
        await eventually(lambda: reconciler.actions.get("completed") == 3, what="all reconciled")
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running

    assert reconciler.actions == {"completed": 3, "error": 1}
    assert all(Payment.replay(uows.db.streams[pid]).is_terminal for pid in ids)
