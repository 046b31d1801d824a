"""Refund handling on the in-memory unit of work and the fake gateway: contract 3 and 4.8.

Each test drives the handlers as the consumer does (request, then settle) and asserts what
the orchestrator would see: the outbox rows, their keys and data, and what the gateway did.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import msgspec
import pytest

from payment.adapters.memory import MemoryUnitOfWorkFactory
from payment.adapters.processors.fake import FakeProcessor
from payment.application.commands import ExecutePayment, InboundRef, SettleRefunds
from payment.application.handlers import (
    ExecutionPolicy,
    RequestResult,
    execute_payment,
    request_payment,
)
from payment.application.refund_worker import RefundWorker
from payment.application.refunds import RefundResult, Refunds, SettleResult
from payment.domain.events import PaymentCompleted
from payment.domain.payment import Payment, PaymentStatus
from payment.domain.processor import (
    OutcomeUnknown,
    RefundOutcome,
    RefundRequest,
)
from support.clock import FakeClock
from support.commands import SELF, refund_cmd, request_cmd

POLICY = ExecutionPolicy(
    call_timeout_s=0.05, max_attempts=2, backoff_initial_s=0.001, backoff_max_s=0.002
)
CHARGE = 12_500


class World:
    """One in-memory database, a fake gateway, and the handlers on them."""

    def __init__(self, gateway: FakeProcessor | None = None) -> None:
        self.uow = MemoryUnitOfWorkFactory()
        self.gateway = gateway or FakeProcessor()
        self.clock = FakeClock()
        self.refunds = Refunds(self.uow, self.gateway, self.clock, POLICY)

    @property
    def db(self) -> Any:
        return self.uow.db

    async def pay(self, booking: str = "BK-1001", *, execute: bool = True) -> uuid.UUID:
        assert await request_payment(request_cmd(booking), self.uow, self.clock) in (
            RequestResult.ACCEPTED,
        )
        payment_id = self.db.bookings[booking]
        if execute:
            await self.execute(payment_id)
        return payment_id

    async def execute(self, payment_id: uuid.UUID) -> None:
        cmd = ExecutePayment(
            inbound=InboundRef(source=SELF, message_id=str(uuid.uuid4())), payment_id=payment_id
        )
        await execute_payment(cmd, self.uow, self.gateway, self.clock, POLICY)

    async def refund(self, booking: str = "BK-1001", **fields: Any) -> RefundResult:
        """Request, then settle as the consumer does."""
        result, payment_id = await self.refunds.request(refund_cmd(booking, **fields))
        if result is RefundResult.ACCEPTED:
            assert payment_id is not None
            await self.refunds.settle(SettleRefunds(payment_id=payment_id))
        return result

    def published(self, kind: str) -> list[dict[str, Any]]:
        return [
            msgspec.json.decode(r.message.data) for r in self.db.outbox if r.message.type == kind
        ]

    def keys(self, kind: str) -> list[str]:
        return [r.message.key for r in self.db.outbox if r.message.type == kind]

    def charge_reference(self, payment_id: uuid.UUID) -> str:
        outcome = self.payment(payment_id).outcome
        assert isinstance(outcome, PaymentCompleted)
        return outcome.provider_reference

    def payment(self, payment_id: uuid.UUID) -> Payment:
        return Payment.replay(self.db.streams[payment_id])


async def test_a_refund_after_success_gives_the_money_back_once() -> None:
    w = World()
    payment_id = await w.pay()
    assert await w.refund(amount=2_000) is RefundResult.ACCEPTED
    (refunded,) = w.published("payment.refunded")
    assert refunded["payment_id"] == str(payment_id)
    assert (refunded["amount"], refunded["refunded_total"], refunded["currency"]) == (
        2_000,
        2_000,
        "EUR",
    )
    assert refunded["saga_id"] == "saga-7" and refunded["provider_reference"].startswith("fake_re_")
    assert w.keys("payment.refunded") == [str(payment_id)]
    assert w.payment(payment_id).status is PaymentStatus.PARTIALLY_REFUNDED
    assert len(w.gateway.refunds) == 1
    assert payment_id not in w.db.refunds_pending


async def test_partial_then_full() -> None:
    w = World()
    payment_id = await w.pay()
    await w.refund(amount=2_500)
    await w.refund()  # the rest
    totals = [(m["amount"], m["refunded_total"]) for m in w.published("payment.refunded")]
    assert totals == [(2_500, 2_500), (10_000, CHARGE)]
    assert w.payment(payment_id).status is PaymentStatus.REFUNDED
    assert w.gateway.refunded(w.charge_reference(payment_id)) == CHARGE


async def test_an_over_refund_is_refused_without_a_refund() -> None:
    w = World()
    payment_id = await w.pay()
    await w.refund(amount=10_000)
    assert await w.refund(amount=2_501) is RefundResult.REFUSED
    (failed,) = w.published("payment.refund_failed")
    assert failed["reason"] == "over_refund" and "refund_id" not in failed
    assert (
        failed["payment_id"] == str(payment_id)
        and failed["version"] == w.payment(payment_id).version
    )
    assert w.keys("payment.refund_failed") == [str(payment_id)]
    assert len(w.gateway.refunds) == 1
    assert await w.refund() is RefundResult.ACCEPTED  # the 2 500 still refundable
    assert await w.refund() is RefundResult.REFUSED  # nothing left


async def test_a_refund_of_a_failed_payment_is_not_charged() -> None:
    w = World(FakeProcessor(mode="fail"))
    payment_id = await w.pay()
    assert await w.refund() is RefundResult.REFUSED
    (failed,) = w.published("payment.refund_failed")
    assert failed["reason"] == "not_charged" and failed["payment_id"] == str(payment_id)
    assert w.gateway.refunds == {}


async def test_a_redelivered_refund_request_changes_nothing() -> None:
    w = World()
    await w.pay()
    assert await w.refund(amount=100, message_id="r-1") is RefundResult.ACCEPTED
    rows = len(w.db.outbox)
    assert await w.refund(amount=100, message_id="r-1") is RefundResult.DUPLICATE
    assert len(w.db.outbox) == rows and len(w.gateway.refunds) == 1


async def test_a_refund_while_in_flight_waits_then_proceeds() -> None:
    w = World()
    payment_id = await w.pay(execute=False)
    assert await w.refund(amount=3_000) is RefundResult.ACCEPTED
    assert w.published("payment.refunded") == [] and w.gateway.refunds == {}
    worker = RefundWorker(w.refunds, threshold_s=60, interval_s=1)
    assert await worker.run_once() == 0  # the charge is still in flight
    w.clock.advance(1)
    await w.execute(payment_id)
    assert await worker.run_once() == 1  # due at once: its charge settled after it
    (refunded,) = w.published("payment.refunded")
    assert refunded["amount"] == 3_000
    completed = [i for i, r in enumerate(w.db.outbox) if r.message.type == "payment.completed"]
    refunded_at = [i for i, r in enumerate(w.db.outbox) if r.message.type == "payment.refunded"]
    assert completed < refunded_at
    assert await worker.run_once() == 0


async def test_a_refund_waiting_for_a_payment_that_fails_is_not_charged() -> None:
    w = World(FakeProcessor(mode="fail"))
    payment_id = await w.pay(execute=False)
    assert await w.refund(amount=3_000) is RefundResult.ACCEPTED
    w.clock.advance(1)
    await w.execute(payment_id)
    await RefundWorker(w.refunds, threshold_s=60, interval_s=1).run_once()
    (failed,) = w.published("payment.refund_failed")
    assert failed["reason"] == "not_charged" and failed["refund_id"]
    assert w.payment(payment_id).pending_refunds == []


async def test_a_refund_for_an_unknown_booking_closes_it() -> None:
    w = World()
    assert await w.refund("BK-9", saga_id="saga-9") is RefundResult.CLOSED
    (failed,) = w.published("payment.refund_failed")
    assert failed["reason"] == "not_charged"
    assert "payment_id" not in failed and "version" not in failed
    assert w.keys("payment.refund_failed") == ["BK-9"]
    # The late payment request charges nothing and is answered `cancelled`.
    assert await request_payment(request_cmd("BK-9"), w.uow, w.clock) is RequestResult.CANCELLED
    (cancelled,) = w.published("payment.failed")
    assert cancelled["reason"] == "cancelled" and cancelled["booking_id"] == "BK-9"
    assert "payment_id" not in cancelled
    assert w.db.streams == {} and w.gateway.charges == {}
    # A second refund for it (new message id) is answered the same way.
    assert await w.refund("BK-9") is RefundResult.CLOSED


@pytest.mark.parametrize(
    ("fields", "says"),
    [({"amount": 0}, "amount"), ({"reason": "card 4242 4242 4242 4242"}, "card")],
)
async def test_an_invalid_refund_request_is_answered_invalid_request(
    fields: dict[str, Any], says: str
) -> None:
    w = World()
    await w.pay()
    assert await w.refund(**fields) is RefundResult.REJECTED
    (failed,) = w.published("payment.refund_failed")
    assert failed["reason"] == "invalid_request" and says in failed["detail"]
    assert "4242" not in str(w.db.outbox)


async def test_fifteen_concurrent_refunds_of_a_tenth_make_exactly_ten() -> None:
    w = World(FakeProcessor(latency_ms=5))
    payment_id = await w.pay()
    results = await asyncio.gather(*(w.refund(amount=CHARGE // 10) for _ in range(15)))
    assert results.count(RefundResult.ACCEPTED) == 10
    assert results.count(RefundResult.REFUSED) == 5
    assert len(w.published("payment.refunded")) == 10
    assert w.payment(payment_id).refunded_total == CHARGE
    assert w.gateway.refunded(w.charge_reference(payment_id)) == CHARGE


class LostAnswers(FakeProcessor):
    """Refunds are made, but the first `lost` answers never arrive."""

    def __init__(self, lost: int) -> None:
        super().__init__()
        self.lost = lost

    async def refund(self, request: RefundRequest) -> RefundOutcome:
        outcome = await super().refund(request)
        if self.lost > 0:
            self.lost -= 1
            raise OutcomeUnknown("connection lost after sending")
        return outcome


async def test_a_refund_timeout_is_unknown_then_reconciled_never_failed() -> None:
    w = World(LostAnswers(lost=1))
    payment_id = await w.pay()
    result, _ = await w.refunds.request(refund_cmd(amount=500))
    assert result is RefundResult.ACCEPTED
    assert await w.refunds.settle(SettleRefunds(payment_id=payment_id)) == [SettleResult.UNKNOWN]
    assert w.published("payment.refund_failed") == [] and w.published("payment.refunded") == []
    worker = RefundWorker(w.refunds, threshold_s=60, interval_s=1)
    assert await worker.run_once() == 0  # not before the threshold
    w.clock.advance(61)
    assert await worker.run_once() == 1  # looked up: the refund was made
    (refunded,) = w.published("payment.refunded")
    assert refunded["amount"] == 500
    assert len(w.gateway.refunds) == 1  # never refunded twice
    assert payment_id not in w.db.refunds_pending
