"""An outcome known is never thrown away: a redelivered `payment.initiated` records it."""

from __future__ import annotations

import pytest
from test_handlers import (
    POLICY,
    FakeClock,
    ScriptedGateway,
    execute_cmd,
    initiate,
    kinds,
    stream,
)

from payment.adapters.memory import MemoryUnitOfWork, MemoryUnitOfWorkFactory
from payment.application.batches import execute_payments
from payment.application.handlers import ExecuteResult, execute_payment
from payment.domain.payment import Payment


@pytest.mark.parametrize("batched", [False, True])
async def test_an_approval_brought_by_a_redelivery_completes_the_payment(batched: bool) -> None:
    uows, clock = MemoryUnitOfWorkFactory(), FakeClock()
    gateway = ScriptedGateway("lost")  # the first answer is lost after the charge
    payment_id = await initiate(uows, clock)
    cmd = execute_cmd(payment_id)
    assert await execute_payment(cmd, uows, gateway, clock, POLICY) is ExecuteResult.UNKNOWN

    # The same message again (its offset was not committed): its inbox mark is taken.
    if batched:
        [again] = await execute_payments([cmd], uows, gateway, clock, POLICY)
    else:
        again = await execute_payment(cmd, uows, gateway, clock, POLICY)

    assert again is ExecuteResult.COMPLETED
    assert kinds(stream(uows, payment_id))[-1] == "PaymentCompleted"
    assert gateway.charges_made == 1


async def test_a_redelivery_that_learns_nothing_new_still_changes_nothing() -> None:
    uows, clock = MemoryUnitOfWorkFactory(), FakeClock()
    gateway = ScriptedGateway("lost", "lost")
    payment_id = await initiate(uows, clock)
    cmd = execute_cmd(payment_id)
    await execute_payment(cmd, uows, gateway, clock, POLICY)
    published = list(uows.db.outbox)

    assert await execute_payment(cmd, uows, gateway, clock, POLICY) is ExecuteResult.DUPLICATE
    # Its write-ahead and its attempt (which ends the write-ahead's lease): no outcome,
    # nothing published.
    assert kinds(stream(uows, payment_id))[-2:] == ["ChargeStarted", "ChargeAttempted"]
    assert Payment.replay(stream(uows, payment_id)).charge_lease is None
    assert uows.db.outbox == published


class CountsExpectedNew(MemoryUnitOfWorkFactory):
    """Counts the inbox marks made expecting the messages new (`Inbox.mark_new`)."""

    def __init__(self) -> None:
        super().__init__()
        self.expected_new = 0

    def __call__(self) -> MemoryUnitOfWork:
        uow = super().__call__()
        mark_new = uow.inbox.mark_new

        async def counting(*args: object) -> None:
            self.expected_new += 1
            await mark_new(*args)  # type: ignore[arg-type]

        uow.inbox.mark_new = counting  # type: ignore[method-assign]
        return uow


async def test_a_wave_that_met_a_redelivery_records_it_the_careful_way_at_once() -> None:
    # The wave expected its messages new and failed on the redelivered one; recorded one
    # by one, that message is not expected new a second time.
    uows, clock = CountsExpectedNew(), FakeClock()
    gateway = ScriptedGateway("lost")
    payment_id = await initiate(uows, clock)
    cmd = execute_cmd(payment_id)
    await execute_payment(cmd, uows, gateway, clock, POLICY)
    before = uows.expected_new

    [again] = await execute_payments([cmd], uows, gateway, clock, POLICY)

    assert again is ExecuteResult.COMPLETED
    assert uows.expected_new - before == 1  # the wave's, not the fallback's too
