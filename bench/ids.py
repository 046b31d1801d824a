"""What the ids the service makes cost PostgreSQL once the store is big: UUID v4 against v7.

For each kind, on a fresh database of the local server (dropped after): the service's
migrations, then `--payments` past payments written by SQL with ids of that kind (three
events, the payment's row, two published outbox rows, two inbox entries each; v7 ids a
millisecond apart, older than any the run makes), a CHECKPOINT, and then whole payments
through the application handlers in batches of 50 for `--seconds` (request, then
execution with the zero-latency fake, as `bench/event_store.py` does) with the service's
id maker patched to the kind. The execution's inbox entry takes a fresh id of the kind,
as the service's takes the ce_id of its own `payment.initiated`. Printed per kind:
payments/s, the client's CPU, PostgreSQL's backends' CPU, WAL bytes, full-page images and
blocks read from outside shared buffers, per payment. The kinds alternate (`--rounds`).

    .venv/bin/python bench/ids.py --payments 1000000 --seconds 20 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import (
    BenchError,
    backend_pids,
    cpu_by_pid,
    cpu_used,
    load,
    scratch_database,
    server_url,
    table,
)
from event_store import HANDLER_BATCH
from past_payments import write_past_payments

from payment.adapters.memory import SystemClock
from payment.adapters.postgres.migrations import migrate
from payment.adapters.postgres.pool import open_pool
from payment.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from payment.adapters.processors.fake import FakeProcessor
from payment.application.batches import execute_payments, request_payments
from payment.application.commands import ExecutePayment, InboundRef, RequestPayment
from payment.application.handlers import ExecuteResult, RequestResult
from payment.domain import ids

MakeId = Callable[[], uuid.UUID]
KINDS: dict[str, MakeId] = {"v4": uuid.uuid4, "v7": ids.new_id}


@dataclass(frozen=True)
class Counters:
    """The server's WAL and the database's reads; backends flush them when they exit."""

    wal_bytes: int
    wal_fpi: int
    blocks_read: int


def _counters(url: str) -> Counters:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn, wal_fpi, blks_read"
            " FROM pg_stat_wal, pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return Counters(int(row[0]), int(row[1]), int(row[2]))


@contextmanager
def ids_of_kind(make: MakeId) -> Iterator[None]:
    """Every module that took `new_id` from payment.domain.ids gets `make` for a while."""
    original = ids.new_id
    patched = [
        m
        for m in list(sys.modules.values())
        if m is not ids and getattr(m, "new_id", None) is original
    ]
    for module in patched:
        module.new_id = make  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module in patched:
            module.new_id = original  # type: ignore[attr-defined]


async def _payments(
    url: str, server: str, db: str, make: MakeId, tasks: int, seconds: float, numbers: Iterator[int]
) -> tuple[int, float, float, float]:
    """Batches on `tasks` tasks for `seconds`: (payments, elapsed s, client CPU s, the
    backends' CPU s). The pool closes before returning, so its backends' counters are in."""
    clock = SystemClock()
    processor = FakeProcessor()
    async with open_pool(url, min_size=tasks, max_size=tasks) as pool:
        uows = PostgresUnitOfWorkFactory(pool)

        async def batch() -> int:
            cmds = [
                RequestPayment(
                    inbound=InboundRef(source="bench-orchestrator", message_id=str(uuid.uuid4())),
                    booking_id=f"now-{n}",
                    amount=1999,
                    currency="EUR",
                    payment_method="pm_card_visa",
                )
                for n in itertools.islice(numbers, HANDLER_BATCH)
            ]
            assert set(await request_payments(cmds, uows, clock)) == {RequestResult.ACCEPTED}
            async with uows() as uow:
                found = [await uow.payments.payment_for_booking(c.booking_id) for c in cmds]
            executions = [
                ExecutePayment(
                    inbound=InboundRef(source="payment-service", message_id=str(make())),
                    payment_id=payment_id,
                )
                for payment_id in found
                if payment_id is not None
            ]
            done = await execute_payments(executions, uows, processor, clock)
            assert set(done) == {ExecuteResult.COMPLETED}
            return HANDLER_BATCH

        async def loop(until: float) -> int:
            done = 0
            while time.perf_counter() < until:
                done += await batch()
            return done

        backends = cpu_by_pid(backend_pids(server, db))
        cpu = time.process_time()
        started = time.perf_counter()
        counts = await asyncio.gather(*(loop(started + seconds) for _ in range(tasks)))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        backend_cpu = cpu_used(backends, cpu_by_pid(backend_pids(server, db)))
    return sum(counts), elapsed, cpu, backend_cpu


def measure(kind: str, payments: int, tasks: int, seconds: float) -> list[str]:
    server = server_url()
    make = KINDS[kind]
    with scratch_database(server, f"bench_ids_{kind}") as (db, url):
        asyncio.run(migrate(url))
        prefill_s = write_past_payments(url, kind, payments)
        numbers = itertools.count()  # booking numbers, unique across both runs
        with ids_of_kind(make):
            asyncio.run(_payments(url, server, db, make, tasks, 1.0, numbers))  # warm-up
            time.sleep(0.5)  # the warm-up's backends write their counters as they exit
            before = _counters(url)
            done, elapsed, client_cpu, backend_cpu = asyncio.run(
                _payments(url, server, db, make, tasks, seconds, numbers)
            )
            time.sleep(0.5)
            after = _counters(url)
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT stream_id FROM payment_events ORDER BY position DESC LIMIT 1"
            ).fetchone()
        assert row is not None
        newest: uuid.UUID = row[0]
        if newest.version != int(kind[1]):
            raise BenchError(f"the run made v{newest.version} ids, not {kind}")
    per = max(done, 1)
    return [
        kind,
        f"{payments:,}",
        f"{prefill_s:.0f}",
        f"{done / elapsed:,.0f}",
        f"{1e3 * client_cpu / per:.3f}",
        f"{1e3 * backend_cpu / per:.3f}",
        f"{(after.wal_bytes - before.wal_bytes) / per:,.0f}",
        f"{(after.wal_fpi - before.wal_fpi) / per:.2f}",
        f"{(after.blocks_read - before.blocks_read) / per:.2f}",
        load(),
    ]


HEADER = [
    "ids", "past payments", "prefill s", "payments/s", "client CPU ms/pay", "PG CPU ms/pay",
    "WAL B/pay", "FPI/pay", "blocks read/pay", "load 1/5/15",
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=1_000_000, help="past payments")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1, help="v4 then v7, this many times")
    args = parser.parse_args(argv)
    print(f"ids: load before {load()}", flush=True)
    rows = []
    try:
        for round_ in range(args.rounds):
            order = ("v4", "v7") if round_ % 2 == 0 else ("v7", "v4")
            for kind in order:
                rows.append(measure(kind, args.payments, args.tasks, args.seconds))
                print(" | ".join(rows[-1]), flush=True)
    except BenchError as exc:
        print(f"ids: {exc}", file=sys.stderr)
        return 1
    print(table(rows, HEADER))
    return 0


if __name__ == "__main__":
    sys.exit(main())
