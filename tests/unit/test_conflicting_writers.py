"""Handlers that keep losing the optimistic lock give up, loudly, instead of looping.

A lost race is retried in a fresh transaction (which sees the winner); a writer that loses
every time raises "too many conflicting writers" with nothing of its own committed, and
the consumer treats that as a handler error. Where the gateway stands then matters: the
write-ahead ChargeStarted failing means the gateway was never called; the outcome failing
to record means it was called once (and the reconciler will find the charge).
"""

from __future__ import annotations

import uuid

import pytest

from payment.adapters.memory import MemoryUnitOfWork, MemoryUnitOfWorkFactory, SystemClock
from payment.adapters.processors.fake import FakeProcessor
from payment.application.commands import ExecutePayment, InboundRef
from payment.application.errors import ConcurrencyConflict
from payment.application.handlers import (
    ExecutionPolicy,
    RequestResult,
    execute_payment,
    request_payment,
)
from payment.domain.payment import Payment
from support.commands import SELF, request_cmd

POLICY = ExecutionPolicy(call_timeout_s=None, max_attempts=1)
CLOCK = SystemClock()


class RivalWins(MemoryUnitOfWorkFactory):
    """From commit number `first_lost` on, `losses` commits lose to a rival writer."""

    def __init__(self, first_lost: int = 1, losses: int = 10**6) -> None:
        super().__init__()
        self.first_lost = first_lost
        self.losses = losses
        self.commits = 0
        self.lost = 0

    def __call__(self) -> MemoryUnitOfWork:
        uow = super().__call__()
        commit = uow.commit

        async def racing() -> None:
            self.commits += 1
            if self.commits >= self.first_lost and self.lost < self.losses:
                self.lost += 1
                raise ConcurrencyConflict(uuid.uuid4(), 0)
            await commit()

        uow.commit = racing  # type: ignore[method-assign]
        return uow


async def test_a_request_that_loses_every_race_gives_up_with_nothing_committed() -> None:
    uows = RivalWins()

    with pytest.raises(RuntimeError, match="too many conflicting writers"):
        await request_payment(request_cmd("BK-RACE"), uows, CLOCK)

    assert uows.lost > 1  # retried before giving up
    assert not uows.db.bookings and not uows.db.inbox and not uows.db.outbox


async def test_a_request_that_loses_a_few_races_is_accepted() -> None:
    uows = RivalWins(losses=3)

    assert await request_payment(request_cmd("BK-RACE"), uows, CLOCK) is RequestResult.ACCEPTED

    assert uows.lost == 3
    assert list(uows.db.bookings) == ["BK-RACE"]


async def _requested(uows: RivalWins) -> ExecutePayment:
    await request_payment(request_cmd("BK-EXEC"), uows, CLOCK)
    payment_id = uows.db.bookings["BK-EXEC"]
    return ExecutePayment(
        inbound=InboundRef(source=SELF, message_id=f"init-{payment_id}"), payment_id=payment_id
    )


async def _execution_giving_up(first_lost: int) -> tuple[RivalWins, ExecutePayment, FakeProcessor]:
    """A requested payment whose execution loses every race from commit `first_lost` on."""
    uows = RivalWins(first_lost=first_lost)
    cmd = await _requested(uows)
    gateway = FakeProcessor()
    with pytest.raises(RuntimeError, match="too many conflicting writers"):
        await execute_payment(cmd, uows, gateway, CLOCK, POLICY)
    assert uows.lost > 1
    return uows, cmd, gateway


async def test_an_execution_whose_charge_start_loses_every_race_never_calls_the_gateway() -> None:
    # The request commits; every write after it loses.
    uows, cmd, gateway = await _execution_giving_up(first_lost=2)

    assert gateway.calls == 0
    assert len(uows.db.streams[cmd.payment_id]) == 1  # PaymentInitiated only


async def test_an_outcome_that_loses_every_race_leaves_the_charge_for_the_reconciler() -> None:
    # The request and the write-ahead ChargeStarted commit; recording the outcome loses.
    uows, cmd, gateway = await _execution_giving_up(first_lost=3)

    assert gateway.calls == 1
    payment = Payment.replay(uows.db.streams[cmd.payment_id])
    assert not payment.is_terminal  # in flight: the reconciler asks the gateway later
    assert cmd.inbound.message_id not in {m for _, m in uows.db.inbox}
