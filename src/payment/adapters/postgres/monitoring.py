"""Read-only queries for metrics, readiness and backpressure: outbox backlog, in-flight
payments, traces."""

from __future__ import annotations

import uuid
from typing import Final

import msgspec
import psycopg

from payment.adapters.postgres.pool import Pool
from payment.application.commands import TraceHeaders

# The oldest unpublished row is the first by position (positions follow commit time
# closely); both reads use the partial index of unpublished rows.
_OUTBOX: Final = """
SELECT
    (SELECT count(*) FROM payment_outbox WHERE published_at IS NULL),
    (SELECT EXTRACT(EPOCH FROM now() - created_at)::float8 FROM payment_outbox
     WHERE published_at IS NULL ORDER BY position LIMIT 1)
"""

# In-flight rows are few (the partial index holds only them). A payment flagged for review
# stays INITIATED until a human resolves it: counted apart, and left out of the oldest age
# so one flagged payment does not hold readiness down for good.
_IN_FLIGHT: Final = """
SELECT
    count(*) FILTER (WHERE NOT f.flagged),
    EXTRACT(EPOCH FROM now() - min(p.updated_at) FILTER (WHERE NOT f.flagged))::float8,
    count(*) FILTER (WHERE f.flagged)
FROM payment_payments p
CROSS JOIN LATERAL (
    SELECT EXISTS (
        SELECT FROM payment_events e
        WHERE e.stream_id = p.payment_id AND e.event_type = 'PaymentFlaggedForReview'
    ) AS flagged
) f
WHERE p.status = 'INITIATED'
"""

# Request intake's backpressure (adapters/kafka/consumer/intake_gate.py) reads this several
# times a second: the LIMIT bounds the count, and so its cost, however large the backlog.
_UNPUBLISHED_UP_TO: Final = """
SELECT count(*) FROM (
    SELECT 1 FROM payment_outbox WHERE published_at IS NULL LIMIT %s
) AS unpublished
"""

_STORED_TRACE: Final = """
SELECT traceparent, tracestate FROM payment_outbox
WHERE subject = %s AND traceparent IS NOT NULL
ORDER BY position
LIMIT 1
"""


class DatabaseStats(msgspec.Struct, frozen=True, kw_only=True):
    """What the database says about work not yet done (ages in seconds; 0 when none)."""

    outbox_backlog: int
    outbox_oldest_age_s: float
    in_flight: int
    in_flight_oldest_age_s: float
    review_pending: int


async def read_stats(pool: Pool) -> DatabaseStats:
    """One consistent-enough reading (two short statements on a pooled connection)."""
    async with pool.connection() as conn:
        cur = await conn.execute(_OUTBOX)
        outbox = await cur.fetchone()
        cur = await conn.execute(_IN_FLIGHT)
        in_flight = await cur.fetchone()
    assert outbox is not None and in_flight is not None
    return DatabaseStats(
        outbox_backlog=int(outbox[0]),
        outbox_oldest_age_s=max(float(outbox[1] or 0.0), 0.0),
        in_flight=int(in_flight[0]),
        in_flight_oldest_age_s=max(float(in_flight[1] or 0.0), 0.0),
        review_pending=int(in_flight[2]),
    )


async def unpublished_outbox_rows(pool: Pool, limit: int) -> int:
    """How many outbox rows are unpublished, counted up to `limit` (served by the partial
    index of unpublished rows). Raises psycopg's errors when the database cannot answer."""
    async with pool.connection() as conn:
        cur = await conn.execute(_UNPUBLISHED_UP_TO, (limit,))
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def stored_trace(pool: Pool, payment_id: uuid.UUID) -> TraceHeaders | None:
    """The trace context stored with the payment's first outbox row, if any.

    None as well when the database cannot be asked: a missing trace must never stop a
    reconciliation.
    """
    try:
        async with pool.connection() as conn:
            cur = await conn.execute(_STORED_TRACE, (str(payment_id),))
            row = await cur.fetchone()
    except (psycopg.Error, TimeoutError):
        return None
    if row is None:
        return None
    return TraceHeaders(traceparent=row[0], tracestate=row[1])
