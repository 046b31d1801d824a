"""Reconciliation at scale: how fast a backlog of unknown outcomes drains within the limits.

A scratch PostgreSQL database holds `--payments` payments in flight, initiated ten minutes
ago (past the reconciler's threshold and Stripe's search lag); `--charged-share` of them
were charged at the gateway before their answer was lost. The gateway is the fake Stripe
of the tests (tests/support/fake_stripe.py, in its own process) answering each call after
`--latency-ms`, allowing `--gateway-rate` requests per second (429 with Retry-After
beyond). The reconciler of `run` (parallel, claims with SKIP LOCKED) works through the
backlog with the real StripeProcessor behind the LimitedProcessor (`--concurrency`,
`--rate`), as `run` wires them. Prints the time it took and the rates.

    .venv/bin/python bench/reconcile_backlog.py --payments 10000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import free_port, scratch_database, server_url

from payment.adapters.memory import SystemClock
from payment.adapters.postgres.migrations import migrate
from payment.adapters.postgres.pool import open_pool
from payment.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from payment.adapters.processors.limits import GatewayLimits, LimitedProcessor
from payment.adapters.processors.stripe import (
    IDEMPOTENCY_KEY_LIFETIME_S,
    SEARCH_LAG_S,
    StripeProcessor,
)
from payment.application.batches import request_payments
from payment.application.commands import InboundRef, RequestPayment
from payment.application.handlers import ExecutionPolicy
from payment.application.reconciler import Reconciler

GATEWAY_SCRIPT = Path(__file__).resolve().parent.parent / "tests" / "support" / "fake_stripe.py"
API_KEY = "sk_test_fake_gateway"


class Earlier:
    """The system clock, `offset` ago: the backlog was initiated in the past."""

    def __init__(self, offset: timedelta) -> None:
        self.offset = offset

    def now(self) -> datetime:
        return SystemClock().now() - self.offset


@contextmanager
def gateway(latency_ms: float, rate: float) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            str(GATEWAY_SCRIPT),
            "--port",
            str(port),
            "--latency-ms",
            f"{latency_ms}:{latency_ms}",
            "--lookup-latency-ms",
            str(latency_ms),
        ],
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                httpx.get(f"{url}/_ledger", timeout=1.0)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(10)


async def seed(
    uow_factory: PostgresUnitOfWorkFactory, url: str, payments: int, charged_share: float
) -> None:
    """The backlog: payments initiated ten minutes ago; a share charged at the gateway."""
    clock = Earlier(timedelta(minutes=10))
    for start in range(0, payments, 500):
        cmds = [
            RequestPayment(
                inbound=InboundRef(source="bench", message_id=uuid.uuid4().hex),
                booking_id=f"backlog-n{n}-{uuid.uuid4().hex[:6]}",
                amount=1999,
                currency="EUR",
                payment_method="pm_card_visa",
            )
            for n in range(start, min(payments, start + 500))
        ]
        await request_payments(cmds, uow_factory, clock)
    async with uow_factory() as uow:
        ids = await uow.payments.in_flight_since(SystemClock().now(), payments)
    charged = ids[: int(len(ids) * charged_share)]
    limit = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:

        async def charge(payment_id: uuid.UUID) -> None:
            async with limit:
                form = {"amount": "1999", "currency": "eur", "confirm": "true"}
                form["metadata[payment_id]"] = str(payment_id)
                response = await client.post(
                    "/v1/payment_intents",
                    data=form,
                    headers={"Idempotency-Key": uuid.uuid4().hex},
                )
                response.raise_for_status()

        await asyncio.gather(*(charge(p) for p in charged))


async def _control(url: str, **change: object) -> dict[str, int]:
    """Switch the gateway's limits (if `change`); its counters."""
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        if change:
            (await client.post("/_control", json=change)).raise_for_status()
        stats: dict[str, int] = (await client.get("/_ledger")).json()["stats"]
    return stats


async def bench(args: argparse.Namespace) -> None:
    with scratch_database(server_url(), "payment_bench_reconcile") as (_, db_url):
        await migrate(db_url)
        with gateway(args.latency_ms, args.gateway_rate) as url:
            async with open_pool(db_url, min_size=4, max_size=16) as pool:
                uow_factory = PostgresUnitOfWorkFactory(pool)
                seeded = time.perf_counter()
                await seed(uow_factory, url, args.payments, args.charged_share)
                print(
                    f"seeded {args.payments} payments in flight "
                    f"({args.charged_share:.0%} charged at the gateway) "
                    f"in {time.perf_counter() - seeded:.1f}s"
                )
                before = await _control(url, rate_limit=args.gateway_rate, retry_after_s=1)
                async with StripeProcessor(
                    API_KEY, api_base=url, name="sandbox", max_connections=args.concurrency
                ) as stripe:
                    limited = LimitedProcessor(
                        stripe,
                        GatewayLimits(max_concurrency=args.concurrency, max_rate=args.rate),
                        call_timeout_s=10.0,
                    )
                    policy = ExecutionPolicy(
                        call_timeout_s=None,
                        key_lifetime_s=IDEMPOTENCY_KEY_LIFETIME_S,
                        lookup_settle_s=SEARCH_LAG_S,
                    )
                    reconciler = Reconciler(
                        uow_factory,
                        limited,
                        SystemClock(),
                        policy,
                        threshold_s=60.0,
                        interval_s=1.0,
                        parallelism=args.concurrency,
                    )
                    started = time.perf_counter()
                    tried = await reconciler.run_once()
                    elapsed = time.perf_counter() - started
                after = await _control(url)
    calls = (after.get("search", 0) - before.get("search", 0)) + (
        after.get("create_requests", 0) - before.get("create_requests", 0)
    )
    print(
        f"reconciled {tried} payments in {elapsed:.1f}s: {tried / elapsed:.1f} payments/s, "
        f"{calls / elapsed:.1f} gateway calls/s (limit {args.rate:g}/s, gateway "
        f"{args.gateway_rate:g}/s, latency {args.latency_ms:g} ms, concurrency "
        f"{args.concurrency}, reconciler parallelism {args.concurrency})"
    )
    print(
        f"  results {dict(sorted(reconciler.actions.items()))}; 429s "
        f"{after.get('rate_limited', 0)}; service throttles {limited.throttles}; calls in "
        f"flight at most {limited.most_in_flight}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=10_000)
    parser.add_argument("--charged-share", type=float, default=0.5)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--gateway-rate", type=float, default=100.0, help="the gateway's limit")
    parser.add_argument("--rate", type=float, default=100.0, help="PAYMENT_PROCESSOR_MAX_RATE")
    parser.add_argument("--concurrency", type=int, default=32)
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
