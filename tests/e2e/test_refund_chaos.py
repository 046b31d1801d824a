"""Chaos with refunds: the real `run` process SIGKILLed again and again while refunds flow.

Payments are made first, undisturbed; then three refunds of 40 % per booking are sent
while the service is killed at random moments (running, or still starting) and restarted.
The gateway is `tests/support/fake_stripe.py` in its own process (its ledger outlives every
crash), with Stripe's idempotency-key semantics, and it loses the answer to some refunds
after making them, so refunds with unknown outcomes must be reconciled, never failed.

Afterwards, with one clean life to drain: every refund request has exactly one outcome
(by `ce_id`: two refunded, the third an over-refund), no refund was executed twice at the
gateway (one Stripe Refund per refund id), and the total the gateway refunded per payment
equals the `payment.refunded` events' and never exceeds the charge. CHAOS_REFUND_KILLS and
CHAOS_SEED change the run.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections import Counter, defaultdict
from contextlib import suppress

import psycopg
import pytest

from support.fake_stripe import FakeStripe

from .harness import ServiceProcess, StackFactory
from .reliability import (
    SEED,
    Record,
    chaos_env,
    format_summary,
    read_topics,
    ready_or_exited,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings(
        "ignore:Use 'content=<...>' to upload raw bytes/text content.:DeprecationWarning"
    ),
]

KILLS = int(os.environ.get("CHAOS_REFUND_KILLS", "20"))
BOOKINGS = 30
CHARGE = 1000
REFUND = 400  # three of them per booking: the third cannot fit
REFUND_ENV = {
    "PAYMENT_REFUND_RETRY_AFTER_S": "2",
    "PAYMENT_REFUND_INTERVAL_S": "0.5",
    # A shared broker keeps Kafka's 6 s floor on session timeouts.
    "PAYMENT_KAFKA_SESSION_TIMEOUT_MS": "6000",
}


async def _one_life(service: ServiceProcess, rng: random.Random) -> str:
    service.start()
    if rng.random() < 0.2:
        with suppress(TimeoutError):
            await service.wait_exit(rng.uniform(0.1, 1.0))
        cause = "SIGKILL while starting"
    elif await ready_or_exited(service):
        with suppress(TimeoutError):
            await service.wait_exit(rng.uniform(0.2, 2.0))
        cause = "SIGKILL while running"
    else:
        cause = "?"
    code = await service.kill()
    if code != -9:
        raise AssertionError(f"service exited by itself with {code}\n{service.log_tail()}")
    return cause


async def test_refunds_under_kill_9_are_made_once_and_never_exceed_the_charge(
    make_stack: StackFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(SEED)
    started = time.monotonic()
    with FakeStripe(latency_ms=(2, 30), lose_response_rate=0.05, seed=SEED) as gateway:
        stack = await make_stack(**gateway.env(), **chaos_env(db_pool_max=8), **REFUND_ENV)
        orch, service = stack.orch, stack.service
        bookings = [f"rchaos-{i}-{uuid.uuid4().hex[:8]}" for i in range(BOOKINGS)]
        for booking in bookings:
            await orch.request(booking, amount=CHARGE)
        await orch.wait_all_terminal(bookings, timeout_s=180)
        assert all(orch.events.terminal(b)[0].kind == "completed" for b in bookings)

        async def send_refunds() -> int:
            sent = 0
            for _ in range(3):
                for booking in rng.sample(bookings, len(bookings)):
                    await orch.refund(booking, amount=REFUND)
                    sent += 1
                    await asyncio.sleep(rng.uniform(0.0, 0.06))
            return sent

        sender = asyncio.create_task(send_refunds())
        causes: Counter[str] = Counter()
        while len(causes) == 0 or sum(causes.values()) < KILLS:
            if sum(causes.values()) == 0:  # the first life started clean (make_stack)
                with suppress(TimeoutError):
                    await service.wait_exit(rng.uniform(0.2, 1.0))
                assert await service.kill() == -9
                causes["SIGKILL while running"] += 1
                continue
            causes[await _one_life(service, rng)] += 1
        requests = await sender
        chaos_s = time.monotonic() - started

        # One clean life drains everything.
        await service.start_ready()

        def answered(log: object) -> bool:
            return all(len({r.ce_id for r in orch.refund_outcomes(b)}) >= 3 for b in bookings)

        await orch.wait_for(answered, timeout_s=180, what="three refund outcomes per booking")
        await _wait_no_refund_pending(stack.database_url)
        assert await service.terminate() == 0
        records = await read_topics(stack.bootstrap, stack.topics)
        intents, stats = gateway.ledger()
        refunds = gateway.refunds()

    # -- the audit -----------------------------------------------------------------------
    by_booking: dict[str, dict[str, Record]] = defaultdict(dict)  # booking -> ce_id -> record
    for record in records:
        if record.kind in ("refunded", "refund_failed"):
            by_booking[record.data["booking_id"]][str(record.ce_id)] = record
    problems: list[str] = []
    refunded_by_payment: Counter[str] = Counter()
    for booking in bookings:
        outcomes = list(by_booking[booking].values())
        kinds = sorted(r.kind for r in outcomes)
        if kinds != ["refund_failed", "refunded", "refunded"]:
            problems.append(f"{booking}: outcomes {kinds}")
        for r in outcomes:
            if r.kind == "refunded":
                refunded_by_payment[r.data["payment_id"]] += r.data["amount"]
            elif r.data["reason"] != "over_refund":
                problems.append(f"{booking}: refund failed as {r.data['reason']}")
    per_refund_id = Counter(r["metadata"].get("refund_id") for r in refunds)
    double_refunds = sum(n - 1 for n in per_refund_id.values() if n > 1)
    payment_of_intent = {i["id"]: i["metadata"].get("payment_id") for i in intents}
    at_gateway: Counter[str] = Counter()
    for r in refunds:
        at_gateway[str(payment_of_intent[r["payment_intent"]])] += r["amount"]
    if at_gateway != refunded_by_payment:
        problems.append(
            f"gateway refunded {dict(at_gateway)} != events {dict(refunded_by_payment)}"
        )
    over = {p: t for p, t in at_gateway.items() if t > CHARGE}

    rows: list[tuple[str, object]] = [
        ("seed", SEED),
        ("kills", sum(causes.values())),
        *((f"  {cause}", n) for cause, n in sorted(causes.items())),
        ("bookings (charged once each)", len(bookings)),
        ("refund requests sent", requests),
        ("refund outcomes (distinct ce_id)", sum(len(v) for v in by_booking.values())),
        ("refunds at the gateway", len(refunds)),
        ("refunded at the gateway", sum(at_gateway.values())),
        ("refunded per payment.refunded events", sum(refunded_by_payment.values())),
        ("double refunds", double_refunds),
        ("payments refunded past the charge", len(over)),
        ("responses lost by the gateway", stats.get("lost_responses", 0)),
        ("chaos phase (s)", round(chaos_s, 1)),
    ]
    with capsys.disabled():
        print("\n" + format_summary("chaos: kill -9 with refunds (fake Stripe gateway)", rows))
    assert not problems, "\n".join(problems[:30])
    assert double_refunds == 0 and not over
    assert len(refunds) == 2 * BOOKINGS


async def _wait_no_refund_pending(database_url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        while True:
            cur = await conn.execute(
                "SELECT count(*) FROM payment_payments WHERE refund_pending_since IS NOT NULL"
            )
            row = await cur.fetchone()
            if row is not None and row[0] == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{row} payments still have refunds pending")
            await asyncio.sleep(0.2)
