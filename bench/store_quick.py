"""Quick store benchmark: request_payment + execute_payment pairs/s on the PostgreSQL adapters.

No Kafka and no relay: the handlers call the unit of work directly, with the fake
processor, on a throwaway database that is dropped afterwards.

    .venv/bin/python bench/store_quick.py --tasks 8 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from payment.adapters.memory import SystemClock
from payment.adapters.postgres.migrations import migrate
from payment.adapters.postgres.pool import open_pool
from payment.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from payment.adapters.processors.fake import FakeProcessor
from payment.application.commands import ExecutePayment, InboundRef, RequestPayment
from payment.application.handlers import (
    ExecuteResult,
    RequestResult,
    execute_payment,
    request_payment,
)

SERVER_ENV_VAR = "PAYMENT_BENCH_POSTGRES_URL"
DEFAULT_SERVER = "postgresql://root@127.0.0.1:5432/postgres"


async def _pairs(
    uow_factory: PostgresUnitOfWorkFactory, until: float, latencies: list[float], tag: str
) -> int:
    clock = SystemClock()
    processor = FakeProcessor()
    done = 0
    while time.perf_counter() < until:
        started = time.perf_counter()
        # Letters between the digits: a long digit run could pass for a card number.
        booking_id = f"bench-{tag}-n{done}"
        request = RequestPayment(
            inbound=InboundRef(source="bench", message_id=uuid.uuid4().hex),
            booking_id=booking_id,
            amount=1999,
            currency="EUR",
            payment_method="pm_card_visa",
        )
        accepted = await request_payment(request, uow_factory, clock)
        assert accepted is RequestResult.ACCEPTED, accepted
        # The executor learns the id from payment.initiated; here one lookup stands in.
        async with uow_factory() as uow:
            payment_id = await uow.payments.payment_for_booking(booking_id)
        assert payment_id is not None
        execute = ExecutePayment(
            inbound=InboundRef(source="bench", message_id=uuid.uuid4().hex),
            payment_id=payment_id,
        )
        result = await execute_payment(execute, uow_factory, processor, clock)
        assert result is ExecuteResult.COMPLETED
        latencies.append(time.perf_counter() - started)
        done += 1
    return done


async def bench(server_url: str, tasks: int, seconds: float, warmup: float) -> None:
    name = f"payment_bench_{uuid.uuid4().hex[:12]}"
    url = urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        await migrate(url)
        async with open_pool(url, min_size=tasks, max_size=tasks) as pool:
            uow_factory = PostgresUnitOfWorkFactory(pool)
            warm: list[float] = []
            until = time.perf_counter() + warmup
            await asyncio.gather(*(_pairs(uow_factory, until, warm, f"w{i}") for i in range(tasks)))
            latencies: list[float] = []
            cpu_started = time.process_time()
            started = time.perf_counter()
            counts = await asyncio.gather(
                *(_pairs(uow_factory, started + seconds, latencies, f"t{i}") for i in range(tasks))
            )
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
        pairs = sum(counts)
        cuts = statistics.quantiles(latencies, n=100)
        print(
            f"{tasks} tasks, {elapsed:.1f}s: {pairs} pairs, {pairs / elapsed:.0f} pairs/s; "
            f"pair latency p50 {cuts[49] * 1000:.1f} ms, p99 {cuts[98] * 1000:.1f} ms; "
            f"client CPU {cpu / pairs * 1e6:.0f} µs per pair"
        )
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-url", default=os.environ.get(SERVER_ENV_VAR, DEFAULT_SERVER))
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args()
    asyncio.run(bench(args.server_url, args.tasks, args.seconds, args.warmup))


if __name__ == "__main__":
    main()
