"""PostgresEventStore: payment streams in `payment_events`, optimistic lock on (stream, version).

Each row holds its event's schema version; rows are read through the upcasters
(domain/upcasting.py), so a stream written by an earlier release replays in today's shapes.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Sequence

import msgspec
import psycopg
from psycopg import errors

from payment.adapters.postgres.rows import json_rows, uuid_array
from payment.adapters.postgres.transaction import Transaction
from payment.application.errors import ConcurrencyConflict
from payment.application.ports import StreamAppend
from payment.domain.events import AnyPaymentEvent, encode_event, event_type
from payment.domain.upcasting import current_version, decode_stored

STREAM_VERSION_CONSTRAINT = "payment_events_stream_version_key"

_LOAD = """
SELECT event_type, schema_version, data::text FROM payment_events
WHERE stream_id = %s ORDER BY version
"""

_LOAD_MANY = """
SELECT stream_id, event_type, schema_version, data::text FROM payment_events
WHERE stream_id = ANY(%s::uuid[])
ORDER BY stream_id, version
"""

# append_many: one fixed statement whatever the number of events (rows.py); the same
# guard as _append_sql, per row. Rows go in (stream, version) order, so two batches that
# share streams wait on each other in the same order and cannot deadlock. The guard is a
# LATERAL probe of the (stream_id, version) index, kept a probe by its LIMIT: written as
# `OR EXISTS (…)`, or as a LATERAL PostgreSQL may flatten into a join, it was planned as a
# hash over a sequential scan of the whole table (seen with auto_explain under load).
_APPEND_MANY = b"""
INSERT INTO payment_events
    (stream_id, version, event_id, event_type, schema_version, data, occurred_at)
SELECT r.stream_id, CASE WHEN r.expected = 0 OR g.found THEN r.version END,
       r.event_id, r.event_type, r.schema_version, r.data, r.occurred_at
FROM json_to_recordset(%s::json) AS r(
    stream_id uuid, version integer, expected integer, event_id uuid, event_type text,
    schema_version integer, data jsonb, occurred_at timestamptz
)
LEFT JOIN LATERAL (
    SELECT true AS found FROM payment_events e
    WHERE e.stream_id = r.stream_id AND e.version = r.expected
    LIMIT 1
) AS g ON true
ORDER BY r.stream_id, r.version
"""

# All events in one statement, one VALUES row each: scalar parameters cost psycopg about a
# tenth of what arrays for unnest() do, and a handler appends one to three events. The
# guard refuses an append to a stream that is *behind* `expected_version` (nothing would
# collide there) by giving the row no version, which the NOT NULL column refuses: an error,
# not a row count to look at, so the unit of work's last message can carry its COMMIT. A
# stream that is ahead of it collides on (stream_id, version), and a concurrent uncommitted
# append of the same version makes this statement wait for that transaction, then collide
# or go ahead.
_EVENT_ROW = "(%s::integer, %s::uuid, %s::text, %s::integer, %s::jsonb, %s::timestamptz)"


@functools.cache
def _append_sql(rows: int) -> bytes:
    values = ", ".join([_EVENT_ROW] * rows)
    return f"""
INSERT INTO payment_events
    (stream_id, version, event_id, event_type, schema_version, data, occurred_at)
SELECT %s::uuid,
       CASE WHEN %s::integer = 0 OR EXISTS (
           SELECT FROM payment_events WHERE stream_id = %s::uuid AND version = %s::integer
       ) THEN e.version END,
       e.event_id, e.event_type, e.schema_version, e.data, e.occurred_at
FROM (VALUES {values}) AS e(version, event_id, event_type, schema_version, data, occurred_at)
ORDER BY e.version
""".encode()


class PostgresEventStore:
    """The EventStore port on PostgreSQL; events are stored as their msgspec JSON."""

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    async def load(self, stream_id: uuid.UUID) -> list[AnyPaymentEvent]:
        cur = await self._tx.read(_LOAD, (stream_id,))
        return [decode_stored(*row) for row in await cur.fetchall()]

    async def load_many(
        self, stream_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, list[AnyPaymentEvent]]:
        if not stream_ids:
            return {}
        cur = await self._tx.read(_LOAD_MANY, (uuid_array(stream_ids),))
        found: dict[uuid.UUID, list[AnyPaymentEvent]] = {}
        for stream_id, kind, schema_version, data in await cur.fetchall():
            found.setdefault(stream_id, []).append(decode_stored(kind, schema_version, data))
        return found

    async def append(
        self, stream_id: uuid.UUID, expected_version: int, events: Sequence[AnyPaymentEvent]
    ) -> None:
        _check(stream_id, expected_version, events)
        if not events:
            return
        params: list[object] = [stream_id, expected_version, stream_id, expected_version]
        for e in events:
            kind = event_type(e)
            params += (
                e.version,
                e.event_id,
                kind,
                current_version(kind),
                encode_event(e).decode(),
                e.occurred_at,
            )
        # Sent with the next statement or the commit (Transaction.defer); a conflict
        # surfaces there.
        self._tx.defer(
            _append_sql(len(events)), params, translate=_conflict_of(stream_id, expected_version)
        )

    async def append_many(self, appends: Sequence[StreamAppend]) -> None:
        if len({a.stream_id for a in appends}) != len(appends):
            raise ValueError("append_many takes each stream once")
        rows: list[dict[str, object]] = []
        for a in appends:
            _check(a.stream_id, a.expected_version, a.events)
            rows += (
                {
                    "stream_id": a.stream_id,
                    "version": e.version,
                    "expected": a.expected_version,
                    "event_id": e.event_id,
                    "event_type": event_type(e),
                    "schema_version": current_version(event_type(e)),
                    "data": msgspec.Raw(encode_event(e)),
                    "occurred_at": e.occurred_at,
                }
                for e in a.events
            )
        if not rows:
            return
        # Which stream conflicted does not matter to the caller, who abandons the whole
        # unit of work: the first one is named.
        first = appends[0]
        self._tx.defer(
            _APPEND_MANY,
            (json_rows(rows),),
            translate=_conflict_of(first.stream_id, first.expected_version),
        )


def _conflict_of(
    stream_id: uuid.UUID, expected_version: int
) -> Callable[[psycopg.Error], Exception | None]:
    """A unique violation of (stream, version): another writer appended first. A version
    left NULL by the guard: the stream is behind the expected version."""

    def translate(exc: psycopg.Error) -> Exception | None:
        ahead = (
            isinstance(exc, errors.UniqueViolation)
            and exc.diag.constraint_name == STREAM_VERSION_CONSTRAINT
        )
        behind = (
            isinstance(exc, errors.NotNullViolation)
            and exc.diag.table_name == "payment_events"
            and exc.diag.column_name == "version"
        )
        if ahead or behind:
            return ConcurrencyConflict(stream_id, expected_version)
        return None

    return translate


def _check(stream_id: uuid.UUID, expected_version: int, events: Sequence[AnyPaymentEvent]) -> None:
    for offset, event in enumerate(events, start=1):
        if event.version != expected_version + offset or event.payment_id != stream_id:
            raise ValueError("events must continue the stream's versions without a gap")
