"""The machine's floor: the service's hops with nothing of the service in them.

A stand-in process (this file with `--serve`) consumes the request topic, commits one
PostgreSQL transaction per fetched batch (a row per record, `synchronous_commit` on),
sends every record on to the initiated topic with the service's own producer settings
(`create_producer`: acks=all, idempotent, no linger) and waits for the acks; it consumes
the initiated topic the same way and sends the outcome. Two consumer hops, two commits
and two acknowledged sends per payment, in Python with asyncio, aiokafka and psycopg as
the service runs them: what any consume-commit-produce service pays on this machine. The
service pays that and its own work: the inbox, the event store, the outbox (a read and a
mark per hop), the charge's write-ahead transaction and the charge.

The load generator, the figures and the probes are bench/e2e.py's, so the rows compare
with its rows line for line.

    .venv/bin/python bench/floor.py --rate 200 --duration 15
    .venv/bin/python bench/floor.py --rate 1000 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Sequence

import psycopg
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import backend_pids, broker, database_counters, scratch_database, server_url, table

import e2e
from payment.adapters.kafka.producer import create_producer
from payment.adapters.kafka.topics import Topics

PARTITIONS = 6  # the service's default (PAYMENT_KAFKA_TOPIC_PARTITIONS)


async def serve(bootstrap: str, db_url: str, topics: Topics, group: str) -> None:
    """Consume, commit, send on; forever (the parent terminates the process)."""
    conn = await psycopg.AsyncConnection.connect(db_url, autocommit=True)
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS floor_rows"
        " (id bigserial PRIMARY KEY, booking text NOT NULL, topic text NOT NULL)"
    )
    producer = create_producer(bootstrap)
    consumer = AIOKafkaConsumer(
        topics.request,
        topics.initiated,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=True,
        auto_commit_interval_ms=200,  # the service's commit interval
        auto_offset_reset="earliest",
        max_poll_records=500,
    )
    onward = {topics.request: topics.initiated, topics.initiated: topics.completed}
    await producer.start()
    await consumer.start()
    try:
        while True:
            fetched = await consumer.getmany(timeout_ms=200, max_records=500)
            records = [record for batch in fetched.values() for record in batch]
            if not records:
                continue
            await conn.execute(
                "INSERT INTO floor_rows (booking, topic)"
                " SELECT * FROM unnest(%s::text[], %s::text[])",
                (
                    [(record.key or b"").decode() for record in records],
                    [record.topic for record in records],
                ),
            )
            acks = [
                await producer.send(
                    onward[record.topic],
                    value=record.value,
                    key=record.key,
                    headers=list(record.headers),
                )
                for record in records
            ]
            await asyncio.gather(*acks)
    finally:
        await consumer.stop()
        await producer.stop()
        await conn.close()


async def create_topics(bootstrap: str, topics: Topics) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = (topics.request, topics.initiated, topics.completed, topics.failed)
        await admin.create_topics([NewTopic(name, PARTITIONS, 1) for name in names])
    finally:
        await admin.close()


def run(rates: Sequence[float], duration_s: float, warmup_s: float) -> list[e2e.StepResult]:
    run_id = uuid.uuid4().hex[:8]
    topics = Topics(
        request=f"floor-{run_id}.request",
        initiated=f"floor-{run_id}.initiated",
        completed=f"floor-{run_id}.completed",
        failed=f"floor-{run_id}.failed",
    )
    server = server_url()
    with broker("kafka") as kafka, scratch_database(server, "bench_floor") as (db, url):
        asyncio.run(create_topics(kafka.bootstrap, topics))
        args = [kafka.bootstrap, url, topics.request, topics.initiated, topics.completed]
        stand_in = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", *args, f"floor-{run_id}"]
        )
        try:
            probes = e2e.Probes(
                service_pids=[stand_in.pid],
                backend_pids=lambda: backend_pids(server, db),
                broker_pid=kafka.pid,
                database_counters=lambda: database_counters(server, db),
            )
            return asyncio.run(
                _steps(kafka.bootstrap, topics, run_id, probes, rates, duration_s, warmup_s)
            )
        finally:
            stand_in.terminate()
            stand_in.wait(10)


async def _steps(
    bootstrap: str,
    topics: Topics,
    run_id: str,
    probes: e2e.Probes,
    rates: Sequence[float],
    duration_s: float,
    warmup_s: float,
) -> list[e2e.StepResult]:
    results: list[e2e.StepResult] = []
    async with e2e.Orchestrator(bootstrap, topics, run_id, 500) as orchestrator:
        await e2e.warm_up(orchestrator, min(rates[0], 500), warmup_s)
        for rate in rates:
            result = await e2e.measure(
                orchestrator, probes, f"floor-{rate:.0f}", rate, duration_s, 30.0
            )
            print(
                f"floor: {rate:.0f}/s offered: {result.throughput:.0f}/s,"
                f" p50/p99 {result.p(50):.0f}/{result.p(99):.0f} ms",
                flush=True,
            )
            results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, action="append", help="requests/s (repeatable)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per step")
    parser.add_argument(
        "--warmup", type=float, default=e2e.WARMUP_S, help="unmeasured seconds first"
    )
    parser.add_argument("--serve", nargs=6, metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        bootstrap, db_url, request, initiated, completed, group = args.serve
        topics = Topics(request=request, initiated=initiated, completed=completed)
        asyncio.run(serve(bootstrap, db_url, topics, group))
        return 0
    results = run(args.rate or [200.0], args.duration, args.warmup)
    print(table([r.row() for r in results], e2e.HEADER))
    return 0


if __name__ == "__main__":
    sys.exit(main())
