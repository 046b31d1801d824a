"""Refunds end to end: the real `payment-service run` process, PostgreSQL and the broker.

What the orchestrator sees on `payment.refunded` / `payment.refund_failed` (contract 3 and
4.8): a refund after success, partial then full, over-refunds refused, concurrent refunds
that together exceed the charge, redeliveries, a refund sent while its payment is in
flight, and a refund that overtakes its payment request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from .harness import (
    Received,
    ServiceStack,
    new_booking,
    open_stack,
    open_stack_on_a_fresh_database,
)

pytestmark = pytest.mark.timeout(240)

# A shared broker keeps Kafka's default floor for session timeouts (6 s; the harness asks
# for 2 s, which only a broker started by the tests allows). No test here rebalances.
BROKER_TIMINGS = {"PAYMENT_KAFKA_SESSION_TIMEOUT_MS": "6000"}

REFUNDED_FIELDS = {
    "payment_id",
    "booking_id",
    "saga_id",
    "refund_id",
    "amount",
    "refunded_total",
    "currency",
    "provider_reference",
    "refunded_at",
    "version",
}


@pytest_asyncio.fixture(scope="module")
async def stack(
    kafka_bootstrap: str, module_database_url: str, e2e_log_dir: Any
) -> AsyncIterator[ServiceStack]:
    """The module's service (fake processor, success mode)."""
    async with open_stack(
        bootstrap=kafka_bootstrap,
        database_url=module_database_url,
        log_dir=e2e_log_dir,
        topic_prefix="e2e-refund",
        **BROKER_TIMINGS,
    ) as opened:
        yield opened


@pytest_asyncio.fixture(scope="module")
async def slow_stack(
    kafka_bootstrap: str, postgres_server_url: str, e2e_log_dir: Any
) -> AsyncIterator[ServiceStack]:
    """A service whose fake gateway takes two seconds per call (refunds sent meanwhile find
    the payment in flight)."""
    async with open_stack_on_a_fresh_database(
        postgres_server_url,
        bootstrap=kafka_bootstrap,
        log_dir=e2e_log_dir,
        topic_prefix="e2e-refund-slow",
        PAYMENT_FAKE_LATENCY_MS="2000",
        **BROKER_TIMINGS,
    ) as opened:
        yield opened


@pytest_asyncio.fixture(scope="module")
async def fail_stack(
    kafka_bootstrap: str, postgres_server_url: str, e2e_log_dir: Any
) -> AsyncIterator[ServiceStack]:
    """A service whose fake gateway declines every charge, after two seconds."""
    async with open_stack_on_a_fresh_database(
        postgres_server_url,
        bootstrap=kafka_bootstrap,
        log_dir=e2e_log_dir,
        topic_prefix="e2e-refund-fail",
        PAYMENT_FAKE_MODE="fail",
        PAYMENT_FAKE_LATENCY_MS="2000",
        **BROKER_TIMINGS,
    ) as opened:
        yield opened


async def _paid(stack: ServiceStack, booking: str, amount: int = 1000) -> Received:
    await stack.orch.request(booking, amount=amount)
    outcome = await stack.orch.wait_outcome(booking)
    assert outcome.kind == "completed", outcome.describe()
    return outcome


def _kinds(records: list[Received]) -> list[str]:
    return [r.kind for r in records]


async def test_a_refund_after_success_then_the_rest(stack: ServiceStack) -> None:
    booking = new_booking("refund")
    completed = await _paid(stack, booking)
    await stack.orch.refund(booking, amount=300, reason="one night less")
    (first,) = await stack.orch.wait_refund_outcomes(booking, 1)
    assert first.kind == "refunded", first.describe()
    assert set(first.data) == REFUNDED_FIELDS
    assert first.data["payment_id"] == completed.payment_id
    assert (first.data["amount"], first.data["refunded_total"]) == (300, 300)
    assert first.key_text == completed.payment_id
    assert first.header("ce_type") == "payment.refunded"
    assert first.header("ce_subject") == completed.payment_id
    await stack.orch.refund(booking)  # all that is left
    _, rest = await stack.orch.wait_refund_outcomes(booking, 2)
    assert rest.kind == "refunded", rest.describe()
    assert (rest.data["amount"], rest.data["refunded_total"]) == (700, 1000)
    assert int(str(rest.header("ce_sequence"))) > int(str(first.header("ce_sequence")))
    # Nothing is left: a third refund is an over-refund, and creates no refund.
    await stack.orch.refund(booking, amount=1)
    *_, over = await stack.orch.wait_refund_outcomes(booking, 3)
    assert over.kind == "refund_failed" and over.data["reason"] == "over_refund"
    assert "refund_id" not in over.data


async def test_an_over_refund_is_refused(stack: ServiceStack) -> None:
    booking = new_booking("over")
    await _paid(stack, booking, amount=500)
    await stack.orch.refund(booking, amount=501)
    (refused,) = await stack.orch.wait_refund_outcomes(booking, 1)
    assert refused.kind == "refund_failed" and refused.data["reason"] == "over_refund"


async def test_a_refund_of_a_failed_payment_is_not_charged(fail_stack: ServiceStack) -> None:
    orch = fail_stack.orch
    booking = new_booking("declined")
    await orch.request(booking)
    failed = await orch.wait_outcome(booking, timeout_s=60)
    assert failed.kind == "failed" and failed.data["reason"] == "declined"
    await orch.refund(booking)
    (refused,) = await orch.wait_refund_outcomes(booking, 1)
    assert refused.kind == "refund_failed" and refused.data["reason"] == "not_charged"
    assert refused.data["payment_id"] == failed.payment_id
    assert "refund_id" not in refused.data


async def test_a_refund_waiting_for_a_payment_that_fails_is_not_charged(
    fail_stack: ServiceStack,
) -> None:
    orch = fail_stack.orch
    booking = new_booking("waits-fails")
    await orch.request(booking)
    await orch.wait_for(lambda log: log.initiated(booking), what="payment.initiated")
    await orch.refund(booking, amount=100)
    (refused,) = await orch.wait_refund_outcomes(booking, 1, timeout_s=60)
    (failed,) = orch.events.terminal(booking)
    assert failed.kind == "failed" and failed.received_at <= refused.received_at
    assert refused.kind == "refund_failed" and refused.data["reason"] == "not_charged"
    assert refused.data["refund_id"]  # recorded while in flight, then failed


@pytest.mark.slow
async def test_fifteen_concurrent_refunds_of_a_tenth_give_exactly_ten(
    stack: ServiceStack,
) -> None:
    """The refunds are sent with distinct keys, so they land on every partition and the
    service handles them at the same time (keyed by booking id, the broker would hand them
    over one by one): only the aggregate's rule under the stream's lock stands between
    them and an over-refund."""
    booking = new_booking("concurrent")
    completed = await _paid(stack, booking, amount=1000)
    orch = stack.orch
    sends = []
    for i in range(15):
        body = {"booking_id": booking, "amount": 100, "saga_id": f"saga-{booking}"}
        sends.append(
            orch.send_raw(
                json.dumps(body).encode(),
                key=f"{booking}-{i}".encode(),
                headers=orch.headers(ce_type="saga.refund_payment"),
                topic=orch.topics.refund,
            )
        )
    await asyncio.gather(*sends)
    outcomes = await orch.wait_refund_outcomes(booking, 15, timeout_s=60)
    refunded = [r for r in outcomes if r.kind == "refunded"]
    refused = [r for r in outcomes if r.kind == "refund_failed"]
    print(
        f"concurrent refunds: {len(refunded)} refunded, {len(refused)} refused, "
        f"refunded total {sum(r.data['amount'] for r in refunded)} of 1000"
    )
    assert len(refunded) == 10
    assert [r.data["reason"] for r in refused] == ["over_refund"] * 5
    assert sum(r.data["amount"] for r in refunded) == 1000
    assert max(r.data["refunded_total"] for r in refunded) == 1000
    assert sorted(r.data["refunded_total"] for r in refunded) == list(range(100, 1001, 100))
    assert len({r.data["refund_id"] for r in refunded}) == 10
    assert {r.key_text for r in outcomes} == {completed.payment_id}
    # Nothing more trickles in.
    await orch.refund(booking, amount=1)
    await orch.wait_refund_outcomes(booking, 16)
    assert len(orch.refund_outcomes(booking)) == 16


async def test_a_redelivered_refund_request_gives_one_outcome(stack: ServiceStack) -> None:
    booking = new_booking("redelivered")
    await _paid(stack, booking)
    sent = await stack.orch.refund(booking, amount=100)
    await stack.orch.wait_refund_outcomes(booking, 1)
    await stack.orch.redeliver(sent)
    await stack.orch.redeliver(sent)
    # Same key, same partition: once the next request's outcome is in, the redeliveries
    # were handled before it.
    await stack.orch.refund(booking, amount=200)
    outcomes = await stack.orch.wait_refund_outcomes(booking, 2)
    await asyncio.sleep(1.0)
    outcomes = stack.orch.refund_outcomes(booking)
    assert _kinds(outcomes) == ["refunded", "refunded"]
    assert [r.data["amount"] for r in outcomes] == [100, 200]


async def test_a_refund_for_a_booking_without_payment_closes_it(stack: ServiceStack) -> None:
    booking = new_booking("overtaken")
    await stack.orch.refund(booking)
    (refused,) = await stack.orch.wait_refund_outcomes(booking, 1)
    assert refused.kind == "refund_failed" and refused.data["reason"] == "not_charged"
    assert "payment_id" not in refused.data and refused.key_text == booking
    # The payment request arrives late: nothing is charged, payment.failed / cancelled.
    await stack.orch.request(booking)
    cancelled = await stack.orch.wait_outcome(booking)
    assert cancelled.kind == "failed" and cancelled.data["reason"] == "cancelled"
    assert "payment_id" not in cancelled.data
    assert stack.orch.events.initiated(booking) == []


async def test_a_refund_sent_while_the_payment_is_in_flight_is_answered_after_it(
    slow_stack: ServiceStack,
) -> None:
    orch = slow_stack.orch
    booking = new_booking("inflight")
    await orch.request(booking, amount=800)
    await orch.wait_for(lambda log: log.initiated(booking), what="payment.initiated")
    await orch.refund(booking, amount=300)
    (refund,) = await orch.wait_refund_outcomes(booking, 1, timeout_s=60)
    (completed,) = orch.events.terminal(booking)
    assert completed.kind == "completed"
    assert refund.kind == "refunded", refund.describe()
    assert refund.data["amount"] == 300 and refund.data["payment_id"] == completed.payment_id
    assert completed.received_at <= refund.received_at
    assert int(str(completed.header("ce_sequence"))) < int(str(refund.header("ce_sequence")))
