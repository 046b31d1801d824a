"""A database that turns read-only (a failover, a maintenance switch) is waited out.

The real PostgreSQL is switched to `default_transaction_read_only` while requests arrive
(its sessions are terminated, so the pool reconnects and every new session is read-only),
left so for longer than a handler error is retried, then switched back without touching
the sessions again: the units of work must drop the read-only sessions themselves. No
request is dead-lettered, and every one is handled once the database is writable again.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit

import psycopg
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from psycopg import sql

from payment.adapters.kafka.consumer import KafkaInboxConsumer
from payment.adapters.memory import SystemClock
from payment.adapters.observability.metrics import Metrics
from payment.adapters.postgres.pool import Pool
from payment.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from payment.adapters.processors.fake import FakeProcessor
from payment.application.handlers import ExecutionPolicy, RequestPolicy
from payment.runtime.transient import is_transient

REQUESTS = "saga.request_payment"
TP = TopicPartition(REQUESTS, 0)
BEFORE, DURING = 10, 30
READ_ONLY_FOR_S = 4.0  # well past the ~1.5 s a handler error used to be retried


def request(offset: int) -> ConsumerRecord[bytes, bytes]:
    value = json.dumps(
        {
            "booking_id": f"BK-{offset}",
            "amount": 1000,
            "currency": "EUR",
            "payment_method": "tok_visa",
        }
    ).encode()
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", f"req-{offset}".encode()),
        ("ce_source", b"saga-orchestrator"),
        ("ce_type", b"saga.request_payment"),
        ("ce_time", b"2026-01-02T03:04:05Z"),
        ("content-type", b"application/json"),
    ]
    return ConsumerRecord(
        topic=REQUESTS,
        partition=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=f"BK-{offset}".encode(),
        value=value,
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=len(value),
        headers=headers,
    )


class Feed:
    """Stands in for AIOKafkaConsumer: hands out what the test puts in, as it arrives."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[ConsumerRecord[bytes, bytes]] = asyncio.Queue()
        self.paused_now: set[TopicPartition] = set()

    async def getmany(
        self, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                first = await self.queue.get()
        except TimeoutError:
            return {}
        records = [first]
        while not self.queue.empty():
            records.append(self.queue.get_nowait())
        return {TP: records}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        pass

    async def stop(self) -> None:
        pass

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused_now |= set(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused_now -= set(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_now)


class Parked:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    async def publish(self, record: ConsumerRecord[bytes, bytes], reason: str) -> None:
        self.reasons.append(reason)


async def _switch(server_url: str, database: str, *, read_only: bool, terminate: bool) -> None:
    async with await psycopg.AsyncConnection.connect(server_url, autocommit=True) as admin:
        await admin.execute(
            sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = {}").format(
                sql.Identifier(database), sql.SQL("on" if read_only else "off")
            )
        )
        if terminate:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )


async def _bookings(pool: Pool) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM payment_payments")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_requests_during_a_read_only_window_wait_and_all_complete(
    pg_pool: Pool, database_url: str, postgres_server_url: str
) -> None:
    database = urlsplit(database_url).path.lstrip("/")
    feed = Feed()
    parked = Parked()

    async def connect(listener: Any) -> Feed:
        await listener.on_partitions_assigned({TP})
        return feed

    inbox = KafkaInboxConsumer(
        consumer_factory=connect,  # type: ignore[arg-type]
        request_topic=REQUESTS,
        initiated_topic="payment.initiated",
        uow_factory=PostgresUnitOfWorkFactory(pg_pool),
        processor=FakeProcessor(),
        clock=SystemClock(),
        dead_letters=parked,
        metrics=Metrics(),
        request_policy=RequestPolicy(),
        policy=ExecutionPolicy(),
        is_transient=is_transient,
        retry_max_s=1.0,
    )
    running = asyncio.create_task(inbox.run())
    try:
        for offset in range(BEFORE):
            feed.queue.put_nowait(request(offset))
        deadline = asyncio.get_running_loop().time() + 10
        while await _bookings(pg_pool) < BEFORE:
            assert asyncio.get_running_loop().time() < deadline, "requests before the switch"
            await asyncio.sleep(0.05)

        await _switch(postgres_server_url, database, read_only=True, terminate=True)
        try:
            for offset in range(BEFORE, BEFORE + DURING):
                feed.queue.put_nowait(request(offset))
                await asyncio.sleep(READ_ONLY_FOR_S / DURING)
            # Nothing could be written meanwhile, and nothing was given up on.
            assert await _read_only_count(pg_pool) == BEFORE
            assert parked.reasons == []
        finally:
            # The sessions are left alone: the read-only ones must be dropped by the
            # units of work that meet their refusal.
            await _switch(postgres_server_url, database, read_only=False, terminate=False)

        deadline = asyncio.get_running_loop().time() + 30
        while await _bookings(pg_pool) < BEFORE + DURING:
            assert asyncio.get_running_loop().time() < deadline, "requests after the switch"
            await asyncio.sleep(0.1)
        assert parked.reasons == []
    finally:
        inbox.stop()
        async with asyncio.timeout(40):
            await running


async def _read_only_count(pool: Pool) -> int:
    """The bookings count, read through the pool's (read-only) sessions."""
    for _ in range(20):
        try:
            return await _bookings(pool)
        except psycopg.OperationalError:
            await asyncio.sleep(0.05)  # a terminated session the pool had not noticed
    return await _bookings(pool)
