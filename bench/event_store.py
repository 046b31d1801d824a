"""Event store benchmark: appends/s and loads/s of PostgresEventStore, against pgbench.

On fresh databases of the local server (dropped after): first pgbench's ceiling for this
machine in this run — 8 clients committing three-INSERT transactions on a scratch table —
then our store through its unit of work: one-event appends (each its own transaction),
appends of 100 streams per transaction (`append_many`, what a consumer batch does), and
loads of two-event streams (outside a transaction, as the executor reads); and whole
payments through the application handlers on this store without the broker (request and
execution, one message per transaction, then in consumer-sized batches): the figure to
set beside the `eventsourcing` peer, which has no broker either.

    .venv/bin/python bench/event_store.py --tasks 8 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import BenchError, load, scratch_database, server_url, table

from payment.adapters.memory import SystemClock
from payment.adapters.postgres.migrations import migrate
from payment.adapters.postgres.pool import open_pool
from payment.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from payment.adapters.processors.fake import FakeProcessor
from payment.application.batches import execute_payments, request_payments
from payment.application.commands import ExecutePayment, InboundRef, RequestPayment
from payment.application.handlers import (
    ExecuteResult,
    RequestResult,
    execute_payment,
    request_payment,
)
from payment.application.ports import StreamAppend
from payment.domain.events import PaymentCompleted, PaymentInitiated

PGBENCH_SCRIPT = """\
\\set k random(1, 1000000000)
BEGIN;
INSERT INTO pgbench_scratch (k, v) VALUES (:k, 'x');
INSERT INTO pgbench_scratch (k, v) VALUES (:k + 1, 'y');
INSERT INTO pgbench_scratch (k, v) VALUES (:k + 2, 'z');
END;
"""
BATCH = 100


@dataclass
class StoreResult:
    what: str
    unit: str
    ops: int
    seconds: float
    cpu_s: float | None
    load: str

    @property
    def rate(self) -> float:
        return self.ops / self.seconds

    def row(self) -> list[str]:
        cpu = "-" if self.cpu_s is None else f"{1e6 * self.cpu_s / max(self.ops, 1):.0f}"
        return [self.what, f"{self.rate:,.0f} {self.unit}/s", cpu, self.load]


HEADER = ["measure", "rate", "client CPU µs/op", "load 1/5/15"]


def pgbench(server: str, clients: int = 8, threads: int = 2, seconds: int = 10) -> StoreResult:
    """pgbench -n -c 8 -j 2 -T 10 with a three-INSERT transaction on a scratch table."""
    with scratch_database(server, "bench_pgbench") as (name, url):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE pgbench_scratch (id bigserial PRIMARY KEY, k bigint, v text)"
            )
        parts = urlsplit(server)
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
            script.write(PGBENCH_SCRIPT)
        env = {**os.environ}
        if parts.password:
            env["PGPASSWORD"] = parts.password
        try:
            done = subprocess.run(
                [
                    "pgbench", "-n", "-c", str(clients), "-j", str(threads), "-T", str(seconds),
                    "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 5432),
                    "-U", parts.username or "postgres", "-f", script.name, name,
                ],
                capture_output=True, text=True, check=False, env=env,
            )  # fmt: skip
        finally:
            os.unlink(script.name)
        match = re.search(r"tps = ([0-9.]+) \(without initial", done.stdout)
        if done.returncode != 0 or match is None:
            raise BenchError(f"pgbench failed:\n{done.stdout}\n{done.stderr}")
        tps = float(match[1])
        return StoreResult(
            what=f"pgbench ceiling: 3-INSERT transactions, {clients} clients",
            unit="tx",
            ops=round(tps * seconds),
            seconds=seconds,
            cpu_s=None,
            load=load(),
        )


def _initiated(stream: uuid.UUID, n: int, at: datetime) -> PaymentInitiated:
    return PaymentInitiated(
        event_id=uuid.uuid4(),
        payment_id=stream,
        version=1,
        occurred_at=at,
        booking_id=f"store-n{n}",
        saga_id=None,
        amount=1999,
        currency="EUR",
        customer_id=None,
        payment_method="pm_card_visa",
        idempotency_key=uuid.uuid4(),
    )


def _completed(stream: uuid.UUID, at: datetime) -> PaymentCompleted:
    return PaymentCompleted(
        event_id=uuid.uuid4(),
        payment_id=stream,
        version=2,
        occurred_at=at,
        processor="fake",
        provider_reference="fake_0123456789abcdef01234567",
    )


async def _timed(
    tasks: int, seconds: float, body: Callable[[int], Awaitable[int]]
) -> tuple[int, float, float]:
    """Run `body(task index)` in a loop on `tasks` tasks for `seconds`; (ops, elapsed, cpu)."""
    until = 0.0
    counts = [0] * tasks

    async def loop(i: int) -> None:
        while time.perf_counter() < until:
            counts[i] += await body(i)

    until = time.perf_counter() + 1.0  # warm-up: prepared statements, pool
    await asyncio.gather(*(loop(i) for i in range(tasks)))
    counts = [0] * tasks
    cpu0 = time.process_time()
    started = time.perf_counter()
    until = started + seconds
    await asyncio.gather(*(loop(i) for i in range(tasks)))
    return sum(counts), time.perf_counter() - started, time.process_time() - cpu0


async def ours(server: str, tasks: int, seconds: float) -> list[StoreResult]:
    results: list[StoreResult] = []
    with scratch_database(server, "bench_store") as (_name, url):
        await migrate(url)
        async with open_pool(url, min_size=tasks, max_size=tasks) as pool:
            uows = PostgresUnitOfWorkFactory(pool)
            streams: list[uuid.UUID] = []

            async def append_one(_: int) -> int:
                stream = uuid.uuid4()
                now = datetime.now(UTC)
                async with uows() as uow:
                    await uow.events.append(stream, 0, [_initiated(stream, len(streams), now)])
                    await uow.commit()
                streams.append(stream)
                return 1

            ops, elapsed, cpu = await _timed(tasks, seconds, append_one)
            results.append(
                StoreResult(
                    "ours: append 1 event, 1 per transaction", "appends", ops, elapsed, cpu, load()
                )
            )

            async def append_batch(_: int) -> int:
                now = datetime.now(UTC)
                batch: list[StreamAppend] = []
                for _n in range(BATCH):
                    stream = uuid.uuid4()
                    batch.append(StreamAppend(stream, 0, [_initiated(stream, 0, now)]))
                async with uows() as uow:
                    await uow.events.append_many(batch)
                    await uow.commit()
                return BATCH

            ops, elapsed, cpu = await _timed(tasks, seconds, append_batch)
            results.append(
                StoreResult(
                    f"ours: append 1 event to each of {BATCH} streams per transaction",
                    "appends",
                    ops,
                    elapsed,
                    cpu,
                    load(),
                )
            )

            # Give the first streams a second event, then load them round-robin.
            sample = streams[:5000]
            now = datetime.now(UTC)
            for start in range(0, len(sample), BATCH):
                async with uows() as uow:
                    await uow.events.append_many(
                        [
                            StreamAppend(s, 1, [_completed(s, now)])
                            for s in sample[start : start + BATCH]
                        ]
                    )
                    await uow.commit()
            cursor = [0]

            async def load_one(_: int) -> int:
                stream = sample[cursor[0] % len(sample)]
                cursor[0] += 1
                async with uows() as uow:
                    events = await uow.events.load(stream)
                assert len(events) == 2
                return 1

            ops, elapsed, cpu = await _timed(tasks, seconds, load_one)
            results.append(
                StoreResult("ours: load a 2-event stream", "loads", ops, elapsed, cpu, load())
            )

            async def load_batch(_: int) -> int:
                start = cursor[0] % len(sample)
                cursor[0] += BATCH
                ids = sample[start : start + BATCH]
                async with uows() as uow:
                    found = await uow.events.load_many(ids)
                assert len(found) == len(ids)
                return len(ids)

            ops, elapsed, cpu = await _timed(tasks, seconds, load_batch)
            results.append(
                StoreResult(
                    f"ours: load {BATCH} 2-event streams per query",
                    "loads",
                    ops,
                    elapsed,
                    cpu,
                    load(),
                )
            )
            results += await _handlers(uows, tasks, seconds)
    return results


HANDLER_BATCH = 50


async def _handlers(
    uows: PostgresUnitOfWorkFactory, tasks: int, seconds: float
) -> list[StoreResult]:
    """Payments through the application handlers on this store, no broker: request, then
    execute with the zero-latency fake (inbox, booking index, events and outbox rows, as
    the service writes them); one message per transaction, then consumer-sized batches."""
    clock = SystemClock()
    processor = FakeProcessor()
    counter = iter(range(10**9))

    def request(n: int) -> RequestPayment:
        return RequestPayment(
            inbound=InboundRef(source="bench", message_id=f"r{n}"),
            booking_id=f"store-n{n}",
            amount=1999,
            currency="EUR",
            payment_method="pm_card_visa",
        )

    def execution(cmd: RequestPayment, payment_id: uuid.UUID) -> ExecutePayment:
        return ExecutePayment(
            inbound=InboundRef(source="self", message_id=f"e{cmd.inbound.message_id}"),
            payment_id=payment_id,
        )

    async def ids_of(cmds: list[RequestPayment]) -> list[uuid.UUID]:
        # The executor learns the ids from payment.initiated; here one read stands in.
        async with uows() as uow:
            found = [await uow.payments.payment_for_booking(c.booking_id) for c in cmds]
        assert all(found)
        return [f for f in found if f is not None]

    async def one_by_one(_: int) -> int:
        cmd = request(next(counter))
        assert await request_payment(cmd, uows, clock) is RequestResult.ACCEPTED
        [payment_id] = await ids_of([cmd])
        result = await execute_payment(execution(cmd, payment_id), uows, processor, clock)
        assert result is ExecuteResult.COMPLETED
        return 1

    async def batched(_: int) -> int:
        cmds = [request(next(counter)) for _ in range(HANDLER_BATCH)]
        assert set(await request_payments(cmds, uows, clock)) == {RequestResult.ACCEPTED}
        ids = await ids_of(cmds)
        executions = [execution(c, p) for c, p in zip(cmds, ids, strict=True)]
        done = await execute_payments(executions, uows, processor, clock)
        assert set(done) == {ExecuteResult.COMPLETED}
        return HANDLER_BATCH

    results = []
    for what, body in (
        ("ours: request + execute, one message per transaction", one_by_one),
        (f"ours: request + execute, batches of {HANDLER_BATCH} messages", batched),
    ):
        ops, elapsed, cpu = await _timed(tasks, seconds, body)
        results.append(StoreResult(what, "payments", ops, elapsed, cpu, load()))
    return results


def run(tasks: int, seconds: float) -> list[StoreResult]:
    server = server_url()
    results = [pgbench(server, seconds=round(seconds))]
    results += asyncio.run(ours(server, tasks, seconds))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args(argv)
    print(f"event store: load before {load()}", flush=True)
    try:
        results = run(args.tasks, args.seconds)
    except BenchError as exc:
        print(f"event store: {exc}", file=sys.stderr)
        return 1
    print(table([r.row() for r in results], HEADER))
    return 0


if __name__ == "__main__":
    sys.exit(main())
