"""The re-drive ledger on PostgreSQL and `redrive` over it: at most once, even concurrently."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from payment.adapters.kafka.redrive import DeadLetter, RedriveResult, redrive
from payment.adapters.postgres.migrations import migrate
from payment.adapters.postgres.redrives import PostgresRedriveLedger
from support.waiting import eventually

DLQ = "payment.dead_letter"
REQUESTS = "saga.request_payment"


class Meta:
    def __init__(self, partition: int, offset: int) -> None:
        self.partition = partition
        self.offset = offset


class FakeProducer:
    """Records what it is asked to send; can be told to fail, or to wait for a signal."""

    def __init__(self, *, fail: bool = False, gate: asyncio.Event | None = None) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes | None]]]] = []
        self.fail = fail
        self.gate = gate
        self.entered = asyncio.Event()  # set once a send began: the claim is taken by then

    async def send_and_wait(self, topic: str, value: bytes | None = None, **record: Any) -> Meta:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append((topic, record.get("key"), value, list(record.get("headers") or ())))
        return Meta(2, 100 + len(self.sent))


def dead_letter(
    offset: int, *, topic: str = REQUESTS, extra: tuple[tuple[str, bytes | None], ...] = ()
) -> DeadLetter:
    return DeadLetter(
        partition=0,
        offset=offset,
        timestamp_ms=0,
        key=b"booking-1",
        value=b'{"booking_id": "booking-1"}',
        headers=(
            ("ce_id", b"id-1"),
            ("ce_type", b"saga.request_payment"),
            ("dlq_reason", b"handler error: Bug"),
            ("dlq_original_topic", topic.encode()),
            ("dlq_original_partition", b"1"),
            ("dlq_original_offset", b"41"),
            ("DLQ_CONSUMER_GROUP", b"payment-service"),
            *extra,
        ),
    )


async def send_back(
    letters: list[DeadLetter],
    wanted: list[str] | None,
    *,
    ledger: PostgresRedriveLedger,
    producer: FakeProducer,
    dry_run: bool = False,
) -> list[RedriveResult]:
    """`redrive` from this module's dead-letter topic to the request topic."""
    return await redrive(
        letters,
        wanted,
        dlq_topic=DLQ,
        allowed_topics=[REQUESTS],
        ledger=ledger,
        producer=producer,
        dry_run=dry_run,
    )


async def test_original_record_without_dlq_headers_once(database_url: str) -> None:
    await migrate(database_url)
    producer = FakeProducer()
    async with PostgresRedriveLedger.connect(database_url) as ledger:
        first = await send_back(
            [dead_letter(5)],
            None,
            ledger=ledger,
            producer=producer,
        )
        # Without the `already` hint: the ledger's own claim says no.
        second = await send_back(
            [dead_letter(5)],
            ["0:5"],
            ledger=ledger,
            producer=producer,
        )
        recorded = await ledger.redriven(DLQ)
    assert [r.outcome for r in first] == ["redriven"]
    assert [r.outcome for r in second] == ["already_redriven"]
    assert producer.sent == [
        (
            REQUESTS,
            b"booking-1",
            b'{"booking_id": "booking-1"}',
            [("ce_id", b"id-1"), ("ce_type", b"saga.request_payment")],
        )
    ]
    assert (recorded[(0, 5)].partition, recorded[(0, 5)].offset) == (2, 101)


async def test_two_concurrent_runs_redrive_a_dead_letter_once(database_url: str) -> None:
    await migrate(database_url)
    gate = asyncio.Event()
    slow, fast = FakeProducer(gate=gate), FakeProducer()
    async with (
        PostgresRedriveLedger.connect(database_url) as one,
        PostgresRedriveLedger.connect(database_url) as two,
    ):
        first = asyncio.create_task(
            send_back(
                [dead_letter(7)],
                None,
                ledger=one,
                producer=slow,
            )
        )
        async with asyncio.timeout(10.0):  # the first run holds the claim, its send is stalled
            await slow.entered.wait()
        second = asyncio.create_task(
            send_back(
                [dead_letter(7)],
                None,
                ledger=two,
                producer=fast,
            )
        )
        # Not a pause and a hope: PostgreSQL says the second run's claim waits on a lock.
        await eventually(lambda: _waiting_on_a_lock(database_url), 10, what="second run blocked")
        assert not second.done(), "the second run waits for the first one's claim"
        gate.set()
        results = [await first, await second]
    assert [r[0].outcome for r in results] == ["redriven", "already_redriven"]
    assert len(slow.sent) + len(fast.sent) == 1


async def _waiting_on_a_lock(database_url: str) -> bool:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        row = await cursor.fetchone()
        return row is not None and row[0] > 0


async def test_a_failed_publication_leaves_no_claim(database_url: str) -> None:
    await migrate(database_url)
    async with PostgresRedriveLedger.connect(database_url) as ledger:
        with pytest.raises(ConnectionError):
            await send_back(
                [dead_letter(9)],
                None,
                ledger=ledger,
                producer=FakeProducer(fail=True),
            )
        assert await ledger.redriven(DLQ) == {}
        retried = await send_back(
            [dead_letter(9)],
            None,
            ledger=ledger,
            producer=FakeProducer(),
        )
    assert [r.outcome for r in retried] == ["redriven"]


async def test_dry_run_and_foreign_topics_publish_nothing(database_url: str) -> None:
    await migrate(database_url)
    producer = FakeProducer()
    async with PostgresRedriveLedger.connect(database_url) as ledger:
        results = await send_back(
            [dead_letter(1), dead_letter(2, topic="elsewhere")],
            None,
            ledger=ledger,
            producer=producer,
            dry_run=True,
        )
        assert await ledger.redriven(DLQ) == {}
    assert [r.outcome for r in results] == ["dry_run", "refused"]
    assert producer.sent == []


async def test_a_dead_letter_with_card_numbers_masked_is_refused_not_redriven(
    database_url: str,
) -> None:
    await migrate(database_url)
    masked = dead_letter(11, extra=(("dlq_card_numbers_masked", b"value,headers"),))
    assert masked.card_numbers_masked == "value,headers"
    assert masked.summary()["card_numbers_masked"] == "value,headers"
    producer = FakeProducer()
    async with PostgresRedriveLedger.connect(database_url) as ledger:
        for dry_run in (True, False):
            results = await send_back(
                [masked, dead_letter(12)],
                None,
                ledger=ledger,
                producer=producer,
                dry_run=dry_run,
            )
            assert [(r.ref, r.outcome) for r in results] == [
                ("0:11", "refused"),
                ("0:12", "dry_run" if dry_run else "redriven"),
            ]
            assert results[0].detail == (
                "card numbers masked in its value,headers when parked: the original record is"
                " not here; the sender must send it again"
            )
        recorded = await ledger.redriven(DLQ)
    assert [topic for topic, *_ in producer.sent] == [REQUESTS], "only the unmasked one"
    assert set(recorded) == {(0, 12)}
