"""The refund worker's failure paths: one payment's error is its own, a failed round is
followed by the next one. Driven through `Refunds`' two calls the worker makes."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import timedelta

import psycopg

from payment.application.commands import SettleRefunds
from payment.application.refund_worker import RefundWorker
from payment.application.refunds import SettleResult
from support.waiting import eventually


class ScriptedRefunds:
    """`Refunds` as the worker sees it: payments due, and settling them (or failing to)."""

    def __init__(self, due: list[uuid.UUID], *, broken: uuid.UUID | None = None) -> None:
        self._due = due
        self.broken = broken
        self.rounds_failing = 0
        self.settled: list[uuid.UUID] = []

    async def due(self, threshold: timedelta, limit: int) -> list[uuid.UUID]:
        if self.rounds_failing:
            self.rounds_failing -= 1
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        due, self._due = self._due, []
        return due

    async def settle(self, cmd: SettleRefunds, *, look_up_first: bool) -> list[SettleResult]:
        assert look_up_first  # a due refund may have reached the gateway before
        if cmd.payment_id == self.broken:
            raise ValueError("unparseable answer from the gateway")
        self.settled.append(cmd.payment_id)
        return [SettleResult.REFUNDED]


async def test_one_payments_error_is_counted_and_the_others_are_settled() -> None:
    payments = [uuid.uuid4() for _ in range(3)]
    refunds = ScriptedRefunds(list(payments), broken=payments[1])
    worker = RefundWorker(refunds, threshold_s=1, interval_s=1)  # type: ignore[arg-type]

    assert await worker.run_once() == 3

    assert refunds.settled == [payments[0], payments[2]]
    assert worker.actions == {"refunded": 2, "error": 1}


async def test_a_failed_round_is_counted_and_the_next_round_settles() -> None:
    payments = [uuid.uuid4() for _ in range(2)]
    refunds = ScriptedRefunds(list(payments))
    refunds.rounds_failing = 1
    worker = RefundWorker(refunds, threshold_s=1, interval_s=0.01)  # type: ignore[arg-type]

    running = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: len(refunds.settled) == 2, what="the refunds settled")
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running

    assert worker.actions == {"error": 1, "refunded": 2}
