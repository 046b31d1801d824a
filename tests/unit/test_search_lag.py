"""A lookup miss is "no charge" only once the payment is older than the gateway's search lag."""

from __future__ import annotations

import msgspec
from test_handlers import POLICY, FakeClock, ScriptedGateway, execute_cmd, initiate, payment_of

from payment.adapters.memory import MemoryUnitOfWorkFactory
from payment.application.commands import ReconcilePayment
from payment.application.handlers import ExecuteResult, execute_payment, reconcile_payment
from payment.domain.payment import PaymentStatus

LAGGING = msgspec.structs.replace(POLICY, lookup_settle_s=60.0)


async def test_a_young_miss_is_an_unknown_outcome_and_nothing_is_charged() -> None:
    uows, clock = MemoryUnitOfWorkFactory(), FakeClock()
    gateway = ScriptedGateway("lost")
    payment_id = await initiate(uows, clock)
    await execute_payment(execute_cmd(payment_id), uows, gateway, clock, LAGGING)
    gateway.ledger.clear()  # the charge happened, but search does not show it yet
    clock.advance(30)

    result = await reconcile_payment(
        ReconcilePayment(payment_id=payment_id), uows, gateway, clock, LAGGING
    )

    assert result is ExecuteResult.UNKNOWN
    assert (gateway.lookup_calls, gateway.charge_calls) == (1, 1)


async def test_past_the_lag_a_miss_is_no_charge_and_the_payment_is_charged_again() -> None:
    uows, clock = MemoryUnitOfWorkFactory(), FakeClock()
    gateway = ScriptedGateway("lost", supports_lookup=False)
    payment_id = await initiate(uows, clock)
    await execute_payment(execute_cmd(payment_id), uows, gateway, clock, LAGGING)
    clock.advance(61)

    result = await reconcile_payment(
        ReconcilePayment(payment_id=payment_id), uows, gateway, clock, LAGGING
    )

    assert result is ExecuteResult.COMPLETED
    assert gateway.charge_calls == 2 and gateway.charges_made == 1  # same key


async def test_the_only_charger_fails_a_refused_payment_without_trusting_a_young_lookup() -> None:
    # Its ChargeStarted proves nobody else charged: no lookup is needed, so the lag does
    # not keep a payment the gateway refused from failing as processor_unavailable.
    uows, clock = MemoryUnitOfWorkFactory(), FakeClock()
    gateway = ScriptedGateway(*["unavailable"] * 5)
    payment_id = await initiate(uows, clock)

    result = await execute_payment(execute_cmd(payment_id), uows, gateway, clock, LAGGING)

    assert result is ExecuteResult.FAILED
    assert gateway.lookup_calls == 0
    assert payment_of(uows, "BK-1001").status is PaymentStatus.FAILED
