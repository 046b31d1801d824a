"""Retention on the real PostgreSQL: what goes, what stays, dedup inside the window, batches."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from payment.adapters.postgres.pool import Pool
from payment.adapters.postgres.retention import (
    RETENTION_LOCK_KEY,
    RetentionJob,
    purge_inbox,
    purge_outbox,
)
from payment.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from payment.application.commands import InboundRef, RequestPayment
from payment.application.handlers import RequestResult, request_payment
from payment.settings import ConfigError, load_settings

NOW = datetime.now(UTC).replace(microsecond=0)
DAY = timedelta(days=1)
WINDOW = timedelta(days=7)


class FixedClock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at


async def add_outbox_row(pool: Pool, *, published_at: datetime | None, created_at: datetime) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute(
            """
            INSERT INTO payment_outbox
                (event_id, type, key, subject, sequence, time, data, created_at, published_at)
            VALUES (%s, 'payment.failed', 'k', NULL, NULL, %s, '{}'::bytea, %s, %s)
            RETURNING position
            """,
            (uuid.uuid4(), created_at, created_at, published_at),
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def add_inbox_mark(pool: Pool, message_id: str, received_at: datetime) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO payment_inbox (source, message_id, received_at) VALUES ('t', %s, %s)",
            (message_id, received_at),
        )


async def outbox_positions(pool: Pool) -> set[int]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT position FROM payment_outbox")
        return {int(r[0]) for r in await cur.fetchall()}


async def inbox_ids(pool: Pool) -> set[str]:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT message_id FROM payment_inbox")
        return {str(r[0]) for r in await cur.fetchall()}


def job(pool: Pool, *, batch: int = 1000, at: datetime = NOW) -> RetentionJob:
    return RetentionJob(
        pool,
        FixedClock(at).now,
        outbox_age=WINDOW,
        inbox_age=WINDOW,
        interval_s=3600,
        batch=batch,
        pause_s=0,
    )


async def test_old_published_rows_go_unpublished_and_recent_ones_stay(pg_pool: Pool) -> None:
    old_published = await add_outbox_row(
        pg_pool, published_at=NOW - 8 * DAY, created_at=NOW - 8 * DAY
    )
    # Created long ago but published recently: its age counts from publication.
    late_published = await add_outbox_row(
        pg_pool, published_at=NOW - 1 * DAY, created_at=NOW - 30 * DAY
    )
    # Never published (a broker outage): it stays however old it is.
    ancient_unpublished = await add_outbox_row(
        pg_pool, published_at=None, created_at=NOW - 365 * DAY
    )
    recent = await add_outbox_row(pg_pool, published_at=NOW, created_at=NOW)
    await add_inbox_mark(pg_pool, "old", NOW - 8 * DAY)
    await add_inbox_mark(pg_pool, "edge", NOW - WINDOW + timedelta(seconds=1))
    await add_inbox_mark(pg_pool, "new", NOW)

    report = await job(pg_pool).run_once()

    assert (report.outbox_rows, report.inbox_rows, report.skipped) == (1, 1, False)
    remaining = await outbox_positions(pg_pool)
    assert old_published not in remaining
    assert {late_published, ancient_unpublished, recent} <= remaining
    assert await inbox_ids(pg_pool) == {"edge", "new"}
    # A second round finds nothing more.
    again = await job(pg_pool).run_once()
    assert (again.outbox_rows, again.inbox_rows) == (0, 0)


async def test_batches_are_bounded_and_the_round_purges_everything_old(pg_pool: Pool) -> None:
    for _ in range(25):
        await add_outbox_row(pg_pool, published_at=NOW - 10 * DAY, created_at=NOW - 10 * DAY)
    for i in range(12):
        await add_inbox_mark(pg_pool, f"m{i}", NOW - 10 * DAY)
    keep = await add_outbox_row(pg_pool, published_at=NOW - DAY, created_at=NOW - DAY)

    # One batch deletes at most `batch` rows, oldest first.
    assert await purge_outbox(pg_pool, NOW - WINDOW, batch=10) == 10
    assert len(await outbox_positions(pg_pool)) == 16
    assert await purge_inbox(pg_pool, NOW - WINDOW, batch=5) == 5

    report = await job(pg_pool, batch=10).run_once()
    # outbox: 10 + 5 (the last batch is short); inbox: 7 remaining in one short batch.
    assert (report.outbox_rows, report.inbox_rows, report.batches) == (15, 7, 3)
    assert await outbox_positions(pg_pool) == {keep}
    assert await inbox_ids(pg_pool) == set()


async def test_oldest_published_rows_go_first(pg_pool: Pool) -> None:
    newer = await add_outbox_row(pg_pool, published_at=NOW - 9 * DAY, created_at=NOW - 20 * DAY)
    older = await add_outbox_row(pg_pool, published_at=NOW - 19 * DAY, created_at=NOW - 20 * DAY)
    assert await purge_outbox(pg_pool, NOW - WINDOW, batch=1) == 1
    assert await outbox_positions(pg_pool) == {newer}
    assert older not in await outbox_positions(pg_pool)


async def test_a_round_stands_aside_while_another_instance_purges(
    pg_pool: Pool, database_url: str
) -> None:
    await add_outbox_row(pg_pool, published_at=NOW - 10 * DAY, created_at=NOW - 10 * DAY)
    async with await psycopg.AsyncConnection.connect(database_url) as other:
        # The other instance's purge transaction, still open.
        await other.execute("SELECT pg_advisory_xact_lock(%s)", (RETENTION_LOCK_KEY,))
        assert await purge_outbox(pg_pool, NOW - WINDOW, batch=10) is None
        report = await job(pg_pool).run_once()
        assert report.skipped and report.outbox_rows == 0
        await other.rollback()
    assert (await job(pg_pool).run_once()).outbox_rows == 1


def request(message_id: str, booking_id: str) -> RequestPayment:
    return RequestPayment(
        inbound=InboundRef(source="orchestrator", message_id=message_id),
        booking_id=booking_id,
        amount=1000,
        currency="EUR",
        payment_method="pm_card_visa",
    )


async def test_deduplication_holds_inside_the_window_and_the_booking_after_it(
    pg_pool: Pool,
) -> None:
    uow = PostgresUnitOfWorkFactory(pg_pool)
    handled_at = NOW - 6 * DAY
    first = request("msg-1", "bk-retention")
    assert await request_payment(first, uow, FixedClock(handled_at)) is RequestResult.ACCEPTED
    # A redelivery just inside the window: the mark survived the purge, nothing happens.
    report = await job(pg_pool, at=handled_at + WINDOW - timedelta(seconds=1)).run_once()
    assert report.inbox_rows == 0
    assert await request_payment(first, uow, FixedClock(NOW)) is RequestResult.DUPLICATE

    # Past the window the mark goes; a very late redelivery is handled again, but the
    # booking's one payment stands: no second payment, no second charge (the payment is
    # still in flight here, so nothing is even re-published).
    report = await job(pg_pool, at=handled_at + WINDOW + timedelta(seconds=1)).run_once()
    assert report.inbox_rows == 1
    assert await request_payment(first, uow, FixedClock(NOW)) is RequestResult.IN_FLIGHT
    async with pg_pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM payment_payments WHERE booking_id = 'bk-retention'"
        )
        assert await cur.fetchone() == (1,)
        cur = await conn.execute("SELECT count(*) FROM payment_events")
        assert await cur.fetchone() == (1,)


async def test_the_job_loop_purges_and_survives_a_failed_round(pg_pool: Pool) -> None:
    await add_outbox_row(pg_pool, published_at=NOW - 10 * DAY, created_at=NOW - 10 * DAY)
    calls = 0

    def flaky_now() -> datetime:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("first round fails")
        return NOW

    loop = RetentionJob(
        pg_pool, flaky_now, outbox_age=WINDOW, inbox_age=None, interval_s=0.01, pause_s=0
    )
    task = asyncio.create_task(loop.run())
    try:
        for _ in range(1000):
            if loop.purged_outbox:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert loop.purged_outbox == 1
    assert loop.failed_rounds == 1


def test_settings_name_the_retention_variables() -> None:
    settings = load_settings(
        {
            "PAYMENT_RETENTION_OUTBOX_DAYS": "2.5",
            "PAYMENT_RETENTION_INBOX_DAYS": "0",
            "PAYMENT_RETENTION_BATCH_SIZE": "50",
        }
    )
    assert settings.retention_outbox_days == 2.5
    assert settings.retention_inbox_days == 0
    assert settings.retention_batch_size == 50
    defaults = load_settings({})
    assert (defaults.retention_outbox_days, defaults.retention_inbox_days) == (7.0, 14.0)
    for name, value in (
        ("PAYMENT_RETENTION_INBOX_DAYS", "-1"),
        ("PAYMENT_RETENTION_BATCH_SIZE", "0"),
        ("PAYMENT_RETENTION_INTERVAL_S", "0"),
    ):
        with pytest.raises(ConfigError, match=name):
            load_settings({name: value})
