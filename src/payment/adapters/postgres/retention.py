"""Retention: published outbox rows and inbox marks past their age are purged, in batches.

What each window means
----------------------
* Outbox: a row is kept `outbox_age` after it was *published*. Nothing reads a published
  row again except `payment-service show` (its outbox section) and the reconciler's trace
  lookup (which does without). Unpublished rows are never touched, however old.
* Inbox: a mark is kept `inbox_age` after the message was handled. Inside that window a
  redelivery (same `ce_source` and `ce_id`) is recognised and changes nothing. After it,
  the same message would be handled again: a request for a booking that already has a
  payment replays the payment's outcome (same `ce_id`) and never charges again (the
  booking's unique payment), but a request that was rejected would be answered with a
  second `payment.failed`. So the window must exceed the longest time a message can come
  back: the broker's retention of the request and initiated topics (a consumer group
  reset to the earliest offset re-reads all of it) plus the orchestrator's longest retry
  horizon.

Both purges delete the oldest rows first, `batch` rows per short transaction, so they
never hold many row locks or one long transaction; with several instances one purges at
a time (a transaction-level advisory lock, skipped rather than awaited).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Final

import msgspec

from payment.adapters.postgres.pool import Pool
from payment.adapters.postgres.prepared_writes import SESSIONS

log = logging.getLogger(__name__)

# Arbitrary but fixed: every instance competes for the same key.
RETENTION_LOCK_KEY: Final = int.from_bytes(b"pay-rtnt", "big")

_TRY_LOCK: Final = "SELECT pg_try_advisory_xact_lock(%s)"

# The inner query walks payment_outbox_published_at_idx from its oldest entry; the outer
# condition repeats the age test so a row can only ever go for being old *and* published.
_PURGE_OUTBOX: Final = """
DELETE FROM payment_outbox
WHERE position = ANY(ARRAY(
        SELECT position FROM payment_outbox
        WHERE published_at IS NOT NULL AND published_at < %(before)s
        ORDER BY published_at
        LIMIT %(limit)s))
  AND published_at IS NOT NULL AND published_at < %(before)s
"""

_PURGE_INBOX: Final = """
DELETE FROM payment_inbox AS i
USING (
    SELECT source, message_id FROM payment_inbox
    WHERE received_at < %(before)s
    ORDER BY received_at
    LIMIT %(limit)s
) AS old
WHERE i.source = old.source AND i.message_id = old.message_id
  AND i.received_at < %(before)s
"""


class PurgeReport(msgspec.Struct, kw_only=True):
    """What one purge round removed."""

    outbox_rows: int = 0
    inbox_rows: int = 0
    batches: int = 0
    # True if another instance held the purge lock and this round stood aside.
    skipped: bool = False


async def purge_batch(pool: Pool, statement: str, before: datetime, limit: int) -> int | None:
    """Delete at most `limit` rows with one purge statement in its own transaction.

    Returns how many rows went, or None if another instance is purging right now.
    """
    async with pool.connection() as conn:
        try:
            async with conn.transaction():
                cur = await conn.execute(_TRY_LOCK, (RETENTION_LOCK_KEY,))
                row = await cur.fetchone()
                if row is None or not row[0]:
                    return None
                cur = await conn.execute(statement, {"before": before, "limit": limit})
                return cur.rowcount
        except BaseException:
            SESSIONS.forget(conn)  # psycopg's rollback may DEALLOCATE ALL (prepared_writes.py)
            raise


async def purge_outbox(pool: Pool, before: datetime, *, batch: int) -> int | None:
    """One batch of published outbox rows published before `before` (None: locked)."""
    return await purge_batch(pool, _PURGE_OUTBOX, before, batch)


async def purge_inbox(pool: Pool, before: datetime, *, batch: int) -> int | None:
    """One batch of inbox marks received before `before` (None: locked)."""
    return await purge_batch(pool, _PURGE_INBOX, before, batch)


class RetentionJob:
    """The background purge of `run`: every `interval_s`, old published outbox rows and old
    inbox marks, oldest first, `batch` rows per transaction, until none is left.

    An age of None keeps that table's rows forever. `pause_s` between batches leaves the
    database to the service's own work when there is a large backlog to purge.
    """

    def __init__(
        self,
        pool: Pool,
        now: Callable[[], datetime],
        *,
        outbox_age: timedelta | None,
        inbox_age: timedelta | None,
        interval_s: float,
        batch: int = 1000,
        pause_s: float = 0.05,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self._pool = pool
        self._now = now
        self._outbox_age = outbox_age
        self._inbox_age = inbox_age
        self._interval_s = interval_s
        self._batch = batch
        self._pause_s = pause_s
        self.purged_outbox = 0
        self.purged_inbox = 0
        self.failed_rounds = 0

    async def run_once(self) -> PurgeReport:
        """Purge both tables down to their windows (as of the start of the round)."""
        report = PurgeReport()
        now = self._now()
        for table, age, statement in (
            ("outbox", self._outbox_age, _PURGE_OUTBOX),
            ("inbox", self._inbox_age, _PURGE_INBOX),
        ):
            if age is None:
                continue
            before = now - age
            while True:
                deleted = await purge_batch(self._pool, statement, before, self._batch)
                if deleted is None:
                    report.skipped = True
                    return report
                report.batches += 1
                if table == "outbox":
                    report.outbox_rows += deleted
                    self.purged_outbox += deleted
                else:
                    report.inbox_rows += deleted
                    self.purged_inbox += deleted
                if deleted < self._batch:
                    break
                await asyncio.sleep(self._pause_s)
        return report

    async def run(self) -> None:
        """Loop until cancelled; a failed round is logged and the next one tries again."""
        if self._outbox_age is None and self._inbox_age is None:
            return
        while True:
            try:
                report = await self.run_once()
                if report.outbox_rows or report.inbox_rows:
                    log.info(
                        "retention: purged %d outbox rows and %d inbox marks in %d batches",
                        report.outbox_rows,
                        report.inbox_rows,
                        report.batches,
                    )
            except asyncio.CancelledError:
                raise
            except Exception:  # the outermost loop: log, count, keep going
                self.failed_rounds += 1
                log.exception("retention: purge round failed; retrying next interval")
            await asyncio.sleep(self._interval_s)
