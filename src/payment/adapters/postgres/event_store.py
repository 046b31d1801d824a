"""PostgresEventStore: payment streams in `payment_events`, optimistic lock on (stream, version)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from psycopg import errors

from payment.adapters.postgres.transaction import Transaction
from payment.application.errors import ConcurrencyConflict
from payment.domain.events import AnyPaymentEvent, decode_event, encode_event, event_type

STREAM_VERSION_CONSTRAINT = "payment_events_stream_version_key"

_LOAD = "SELECT data::text FROM payment_events WHERE stream_id = %s ORDER BY version"

# All events in one statement. The WHERE guard refuses an append to a stream that is
# *behind* `expected_version` (nothing would collide there); a stream that is ahead of it
# collides on (stream_id, version), and a concurrent uncommitted append of the same
# version makes this statement wait for that transaction, then collide or go ahead.
_APPEND = """
INSERT INTO payment_events (stream_id, version, event_id, event_type, data, occurred_at)
SELECT %(stream_id)s, e.version, e.event_id, e.event_type, e.data, e.occurred_at
FROM unnest(
    %(versions)s::integer[],
    %(event_ids)s::uuid[],
    %(types)s::text[],
    %(data)s::jsonb[],
    %(occurred_at)s::timestamptz[]
) WITH ORDINALITY AS e(version, event_id, event_type, data, occurred_at, ord)
WHERE %(expected)s::integer = 0
   OR EXISTS (
        SELECT FROM payment_events
        WHERE stream_id = %(stream_id)s AND version = %(expected)s::integer
   )
ORDER BY e.ord
"""


class PostgresEventStore:
    """The EventStore port on PostgreSQL; events are stored as their msgspec JSON."""

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    async def load(self, stream_id: uuid.UUID) -> list[AnyPaymentEvent]:
        cur = await self._tx.reader().execute(_LOAD, (stream_id,))
        return [decode_event(data) for (data,) in await cur.fetchall()]

    async def append(
        self, stream_id: uuid.UUID, expected_version: int, events: Sequence[AnyPaymentEvent]
    ) -> None:
        for offset, event in enumerate(events, start=1):
            if event.version != expected_version + offset or event.payment_id != stream_id:
                raise ValueError("events must continue the stream's versions without a gap")
        if not events:
            return
        params = {
            "stream_id": stream_id,
            "expected": expected_version,
            "versions": [e.version for e in events],
            "event_ids": [e.event_id for e in events],
            "types": [event_type(e) for e in events],
            "data": [encode_event(e).decode() for e in events],
            "occurred_at": [e.occurred_at for e in events],
        }
        try:
            cur = await self._tx.writer().execute(_APPEND, params)
        except errors.UniqueViolation as exc:
            if exc.diag.constraint_name == STREAM_VERSION_CONSTRAINT:
                # The transaction is aborted now; the caller retries in a fresh one.
                raise ConcurrencyConflict(stream_id, expected_version) from None
            raise
        if cur.rowcount != len(events):
            raise ConcurrencyConflict(stream_id, expected_version)
