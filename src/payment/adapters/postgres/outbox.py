"""PostgresOutbox, the outbox notification channel and the single-relay lock.

Ordering
--------
`pending` reads *unpublished rows by position*, with no cursor remembered between calls.

* Nothing is skipped. A relay that remembers "the last position I published" loses rows:
  positions come from a sequence when a row is inserted, but rows become visible when
  their transaction commits, so a slow transaction can commit position 10 after position
  11 was read and passed. Here a row is only ever left out because it is already marked
  published, so a late commit is simply returned by a later call.
* One stream's rows come back in the order they were written. A handler writes a
  stream's next outbox row only in a transaction that first read the stream's events and
  then appended to it under the (stream_id, version) lock, so the transaction holding the
  previous row of that stream had already committed. Its position was drawn before that
  commit, the next row's after it, and the identity sequence hands out increasing values
  in time order across sessions (it has CACHE 1; a cached sequence would break this). So
  within a stream, position order is write order, and a row is never visible before its
  predecessor. Re-published outcomes (a re-request of a terminal payment) also read the
  committed terminal event first, so they follow it. Rows of a stream written in one
  transaction are numbered in the order given.

Across streams the relay may publish a late row after higher positions: the contract
orders a payment's events only, per Kafka key.

Waking the relay
----------------
A statement trigger sends NOTIFY `payment_outbox` with each inserting transaction,
delivered on commit. `listen_for_outbox` and `wait_for_outbox` use it on a dedicated
connection (`pool.connect_dedicated`). A notification is a hint, not a queue: a relay still
polls when `wait_for_outbox` times out (one lost connection loses notifications).

One relay at a time: see relay_lock (the relay lock and `RelayLeadership`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Collection, Sequence
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Final, cast

import psycopg

from payment.adapters.postgres.pool import Connection, connect_dedicated
from payment.adapters.postgres.rows import int_array, json_rows
from payment.adapters.postgres.transaction import Transaction
from payment.application.commands import TraceHeaders
from payment.application.messages import OutboundMessage, OutboundType
from payment.application.ports import OutboxRecord

OUTBOX_CHANNEL: Final = "payment_outbox"

# One VALUES row per message (scalar parameters: see event_store), numbered so that the
# positions follow the order given.
_MESSAGE_ROW = (
    "({ord}, %s::uuid, %s::text, %s::text, %s::text, %s::integer, %s::timestamptz, %s::bytea,"
    " %s::text, %s::text, %s::integer)"
)


@functools.cache
def _add_sql(rows: int) -> bytes:
    values = ", ".join(_MESSAGE_ROW.format(ord=n) for n in range(rows))
    return f"""
INSERT INTO payment_outbox
    (event_id, type, key, subject, sequence, time, data, traceparent, tracestate, schema_version)
SELECT m.event_id, m.type, m.key, m.subject, m.sequence, m.time, m.data,
       m.traceparent, m.tracestate, m.schema_version
FROM (VALUES {values})
    AS m(ord, event_id, type, key, subject, sequence, time, data, traceparent, tracestate,
         schema_version)
ORDER BY m.ord
""".encode()


# More rows than this go as one JSON parameter (rows.py) instead of VALUES rows.
_VALUES_MAX = 4

_ADD_MANY = b"""
INSERT INTO payment_outbox
    (event_id, type, key, subject, sequence, time, data, traceparent, tracestate, schema_version)
SELECT m.event_id, m.type, m.key, m.subject, m.sequence, m.time, convert_to(m.data, 'UTF8'),
       m.traceparent, m.tracestate, m.schema_version
FROM json_to_recordset(%s::json) AS m(
    ord integer, event_id uuid, type text, key text, subject text, sequence integer,
    time timestamptz, data text, traceparent text, tracestate text, schema_version integer
)
ORDER BY m.ord
"""

# Served by the partial index payment_outbox_unpublished_idx.
_PENDING = """
SELECT position, event_id, type, key, subject, sequence, time, data, traceparent, tracestate,
       schema_version
FROM payment_outbox
WHERE published_at IS NULL
ORDER BY position
LIMIT %s
"""

_PENDING_SKIPPING = """
SELECT position, event_id, type, key, subject, sequence, time, data, traceparent, tracestate,
       schema_version
FROM payment_outbox
WHERE published_at IS NULL AND key <> ALL(%s::text[]) AND position <> ALL(%s::bigint[])
ORDER BY position
LIMIT %s
"""

_MARK_PUBLISHED = """
UPDATE payment_outbox SET published_at = %s
WHERE position = ANY(%s::bigint[]) AND published_at IS NULL
"""


class PostgresOutbox:
    """The Outbox port on PostgreSQL (see the module docstring for the ordering argument)."""

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    async def add(self, messages: Sequence[OutboundMessage]) -> None:
        if not messages:
            return
        if len(messages) > _VALUES_MAX:
            try:
                rows = _json_rows(messages)
            except ValueError:
                pass  # not UTF-8 text: bytea parameters below take anything
            else:
                self._tx.defer(_ADD_MANY, (rows,))
                return
        params: list[object] = []
        for m in messages:
            params += (
                m.event_id,
                m.type,
                m.key,
                m.subject,
                m.sequence,
                m.time,
                m.data,
                m.trace.traceparent,
                m.trace.tracestate,
                m.schema_version,
            )
        self._tx.defer(_add_sql(len(messages)), params)

    async def pending(
        self, limit: int, skip_keys: Collection[str] = (), skip_positions: Collection[int] = ()
    ) -> list[OutboxRecord]:
        if skip_keys or skip_positions:
            params = (list(skip_keys), int_array(skip_positions), limit)
            cur = await self._tx.read(_PENDING_SKIPPING, params)
        else:
            cur = await self._tx.read(_PENDING, (limit,))
        return [
            OutboxRecord(
                position=position,
                message=OutboundMessage(
                    event_id=event_id,
                    type=cast(OutboundType, kind),
                    key=key,
                    subject=subject,
                    sequence=sequence,
                    time=time.astimezone(UTC),
                    data=data,
                    trace=TraceHeaders(traceparent=traceparent, tracestate=tracestate),
                    schema_version=schema_version,
                ),
            )
            for (
                position,
                event_id,
                kind,
                key,
                subject,
                sequence,
                time,
                data,
                traceparent,
                tracestate,
                schema_version,
            ) in await cur.fetchall()
        ]

    async def mark_published(self, positions: Sequence[int], at: datetime) -> None:
        if not positions:
            return
        self._tx.defer(_MARK_PUBLISHED, (at, int_array(positions)))


def _json_rows(messages: Sequence[OutboundMessage]) -> str:
    """The messages as JSON rows; ValueError if a payload is not UTF-8 text without NUL."""
    if any(b"\x00" in m.data for m in messages):
        raise ValueError("NUL in a payload: PostgreSQL text cannot hold it")
    return json_rows(
        [
            {
                "ord": n,
                "event_id": m.event_id,
                "type": m.type,
                "key": m.key,
                "subject": m.subject,
                "sequence": m.sequence,
                "time": m.time,
                # Text in the JSON, bytes again in the table: convert_to gives back
                # exactly the UTF-8 bytes given.
                "data": m.data.decode("utf-8"),
                "traceparent": m.trace.traceparent,
                "tracestate": m.trace.tracestate,
                "schema_version": m.schema_version,
            }
            for n, m in enumerate(messages)
        ]
    )


async def listen_for_outbox(conn: Connection) -> None:
    """Subscribe a dedicated autocommit connection to outbox inserts.

    Subscribe before the first `pending` call: a row committed in between is then either
    returned by that call or announced by a notification.
    """
    if not conn.autocommit:
        # In a transaction, LISTEN takes effect, and notifications arrive, only at commit.
        raise ValueError("LISTEN needs an autocommit connection (see connect_dedicated)")
    await conn.execute("LISTEN payment_outbox")


async def wait_for_outbox(conn: Connection, seconds: float) -> bool:
    """Wait up to `seconds` for outbox inserts; True if at least one was announced.

    Consumes every notification already received, so a burst of commits wakes the caller
    once. Raises psycopg.OperationalError if the connection is lost.
    """
    woken = await _one_notification(conn, seconds)
    # psycopg hands over one queued notification per call: take the rest without waiting,
    # or each commit of a burst would wake the relay for a pass of its own.
    while woken and await _one_notification(conn, 0.0):
        pass
    return woken


async def _one_notification(conn: Connection, seconds: float) -> bool:
    # aclosing: leaving the generator suspended would keep the connection's lock held.
    async with aclosing(conn.notifies(timeout=seconds, stop_after=1)) as notifications:
        async for _ in notifications:
            return True
    return False


class OutboxWaiter:
    """The relay's `wait_for_work(seconds)`: LISTEN on a dedicated connection of its own.

    Connects lazily and again after a lost connection; each (re)connection returns at once,
    because notifications sent while unsubscribed are lost and the caller must poll. If the
    database cannot be reached it sleeps `seconds`: the caller's poll reports the error.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: Connection | None = None

    async def __call__(self, seconds: float) -> None:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = None
                conn = await connect_dedicated(self._url)
                self._conn = conn
                await listen_for_outbox(conn)
                return
            await wait_for_outbox(self._conn, seconds)
        except psycopg.OperationalError:
            await self.aclose()
            await asyncio.sleep(seconds)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


def wait_for_outbox_notification(url: str) -> OutboxWaiter:
    """A `wait_for_work` callable for the outbox relay; `aclose()` it at shutdown."""
    return OutboxWaiter(url)


__all__ = [
    "OUTBOX_CHANNEL",
    "OutboxWaiter",
    "PostgresOutbox",
    "listen_for_outbox",
    "wait_for_outbox",
    "wait_for_outbox_notification",
]
