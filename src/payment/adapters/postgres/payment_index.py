"""PostgresPaymentIndex: booking -> payment and payment status in `payment_payments`."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime

import psycopg
from psycopg import errors

from payment.adapters.postgres.rows import json_rows
from payment.adapters.postgres.transaction import Transaction
from payment.application.errors import BookingAlreadyClaimed
from payment.domain.ids import new_id
from payment.domain.payment import PaymentStatus

# ON CONFLICT instead of a unique violation: the loser learns it lost without aborting its
# transaction (and without an ERROR line in the server log per lost race). A concurrent
# uncommitted claim of the same booking makes this wait for that transaction's outcome.
_CLAIM = """
INSERT INTO payment_payments (payment_id, booking_id, status, created_at, updated_at)
VALUES (%s, %s, 'INITIATED', %s, %s)
ON CONFLICT (booking_id) DO NOTHING
"""

# claim_free_bookings: no ON CONFLICT, so a taken booking is an error (see the port).
_CLAIM_FREE = """
INSERT INTO payment_payments (payment_id, booking_id, status, created_at, updated_at)
VALUES (%s, %s, 'INITIATED', %s, %s)
"""

_BOOKING_KEY = "payment_payments_booking_id_key"

# Bookings in a fixed order: two batches sharing bookings cannot deadlock.
_CLAIM_MANY = b"""
INSERT INTO payment_payments (payment_id, booking_id, status, created_at, updated_at)
SELECT r.payment_id, r.booking_id, 'INITIATED', %s::timestamptz, %s::timestamptz
FROM json_to_recordset(%s::json) AS r(payment_id uuid, booking_id text)
ORDER BY r.booking_id
ON CONFLICT (booking_id) DO NOTHING
RETURNING booking_id
"""

# claim_free_bookings of several: the same order, and a taken booking is an error.
_CLAIM_MANY_FREE = b"""
INSERT INTO payment_payments (payment_id, booking_id, status, created_at, updated_at)
SELECT r.payment_id, r.booking_id, 'INITIATED', %s::timestamptz, %s::timestamptz
FROM json_to_recordset(%s::json) AS r(payment_id uuid, booking_id text)
ORDER BY r.booking_id
"""

# A closed booking's row names no payment.
_FOR_BOOKING = (
    "SELECT payment_id FROM payment_payments WHERE booking_id = %s AND status <> 'CANCELLED'"
)

# As _CLAIM: a concurrent uncommitted claim makes this wait for its outcome, and one wins.
_CLOSE = """
INSERT INTO payment_payments (payment_id, booking_id, status, created_at, updated_at)
VALUES (%s, %s, 'CANCELLED', %s, %s)
ON CONFLICT (booking_id) DO NOTHING
"""

_BOOKING_ROW = "SELECT payment_id, status FROM payment_payments WHERE booking_id = %s"

_SET_REFUNDS_PENDING = "UPDATE payment_payments SET refund_pending_since = %s WHERE payment_id = %s"

# Only while marked: a payment whose refunds were all settled meanwhile stays unmarked.
_REQUEUE_REFUNDS = """
UPDATE payment_payments SET refund_pending_since = %s
WHERE payment_id = %s AND refund_pending_since IS NOT NULL
"""

# Served by payment_payments_refund_pending_idx. Due: the charge has settled, and either
# it settled after the refunds were marked (they waited for it) or the mark is old.
_REFUNDS_DUE = """
SELECT payment_id FROM payment_payments
WHERE refund_pending_since IS NOT NULL
  AND status IN ('COMPLETED', 'FAILED')
  AND (refund_pending_since < %s OR updated_at > refund_pending_since)
ORDER BY refund_pending_since, payment_id
LIMIT %s
"""

_SET_STATUS = "UPDATE payment_payments SET status = %s, updated_at = %s WHERE payment_id = %s"

# One statement per status (a batch has one or two): by primary key. A join with a JSON
# recordset instead is planned as a hash join over a sequential scan of the table.
_SET_STATUSES = (
    "UPDATE payment_payments SET status = %s, updated_at = %s WHERE payment_id = ANY(%s)"
)

# Only while in flight: a payment finished meanwhile keeps its status and time.
_REQUEUE = (
    "UPDATE payment_payments SET updated_at = %s WHERE payment_id = %s AND status = 'INITIATED'"
)

# Served by the partial index payment_payments_in_flight_idx.
_IN_FLIGHT = """
SELECT payment_id FROM payment_payments
WHERE status = 'INITIATED' AND updated_at < %s
ORDER BY updated_at, payment_id
LIMIT %s
"""

# SKIP LOCKED: rows another claimer holds are passed over, not waited for; the lease
# (updated_at) keeps them out of the next claims once this commits.
_CLAIM_STALE = """
WITH picked AS (
    SELECT payment_id, updated_at AS since FROM payment_payments
    WHERE status = 'INITIATED' AND updated_at < %s
    ORDER BY updated_at, payment_id
    LIMIT %s
    FOR UPDATE SKIP LOCKED
)
UPDATE payment_payments AS p SET updated_at = %s
FROM picked WHERE p.payment_id = picked.payment_id
RETURNING p.payment_id, picked.since
"""


class PostgresPaymentIndex:
    """The PaymentIndex port on PostgreSQL; the booking's uniqueness is a table constraint."""

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    async def claim_booking(self, booking_id: str, payment_id: uuid.UUID, at: datetime) -> None:
        cur = await self._tx.write(_CLAIM, (payment_id, booking_id, at, at))
        if cur.rowcount != 1:
            raise BookingAlreadyClaimed(booking_id)

    async def claim_free_bookings(
        self, claims: Sequence[tuple[str, uuid.UUID]], at: datetime
    ) -> None:
        if len(claims) == 1:
            ((booking_id, payment_id),) = claims
            params: tuple[object, ...] = (payment_id, booking_id, at, at)
            self._tx.defer(_CLAIM_FREE, params, translate=_taken(booking_id))
        elif claims:
            rows = json_rows([{"payment_id": pid, "booking_id": bid} for bid, pid in claims])
            # Which booking was taken is only in the error's text (DETAIL): not parsed.
            self._tx.defer(_CLAIM_MANY_FREE, (at, at, rows), translate=_taken(""))

    async def claim_bookings(
        self, claims: Sequence[tuple[str, uuid.UUID]], at: datetime
    ) -> set[str]:
        first = dict(reversed(claims))  # the first pair of a booking wins
        if not first:
            return set()
        rows = json_rows([{"payment_id": pid, "booking_id": bid} for bid, pid in first.items()])
        cur = await self._tx.write(_CLAIM_MANY, (at, at, rows))
        return {booking_id for (booking_id,) in await cur.fetchall()}

    async def payment_for_booking(self, booking_id: str) -> uuid.UUID | None:
        cur = await self._tx.read(_FOR_BOOKING, (booking_id,))
        row = await cur.fetchone()
        return None if row is None else _uuid(row[0])

    async def set_status(self, payment_id: uuid.UUID, status: PaymentStatus, at: datetime) -> None:
        self._tx.defer(_SET_STATUS, (status.value, at, payment_id))

    async def set_statuses(
        self, statuses: Sequence[tuple[uuid.UUID, PaymentStatus]], at: datetime
    ) -> None:
        by_status: dict[PaymentStatus, list[uuid.UUID]] = {}
        for payment_id, status in statuses:
            by_status.setdefault(status, []).append(payment_id)
        for status, ids in by_status.items():
            self._tx.defer(_SET_STATUSES, (status.value, at, ids))

    async def in_flight_since(self, before: datetime, limit: int) -> list[uuid.UUID]:
        cur = await self._tx.read(_IN_FLIGHT, (before, limit))
        return [_uuid(payment_id) for (payment_id,) in await cur.fetchall()]

    async def claim_stale(self, before: datetime, limit: int, at: datetime) -> list[uuid.UUID]:
        cur = await self._tx.write(_CLAIM_STALE, (before, limit, at))
        # RETURNING keeps no order: sort by the last change they had before the claim.
        rows = sorted((since, str(pid), pid) for pid, since in await cur.fetchall())
        return [_uuid(pid) for _, _, pid in rows]

    async def requeue(self, payment_id: uuid.UUID, at: datetime) -> None:
        self._tx.defer(_REQUEUE, (at, payment_id))

    async def close_booking(self, booking_id: str, at: datetime) -> uuid.UUID | None:
        cur = await self._tx.write(_CLOSE, (new_id(), booking_id, at, at))
        if cur.rowcount == 1:
            return None
        cur = await self._tx.read(_BOOKING_ROW, (booking_id,))
        row = await cur.fetchone()
        if row is None:
            # The row in the way was rolled back meanwhile: the caller retries afresh.
            raise BookingAlreadyClaimed(booking_id)
        payment_id, status = row
        return None if status == "CANCELLED" else _uuid(payment_id)

    async def booking_closed(self, booking_id: str) -> bool:
        cur = await self._tx.read(_BOOKING_ROW, (booking_id,))
        row = await cur.fetchone()
        return row is not None and row[1] == "CANCELLED"

    async def set_refunds_pending(self, payment_id: uuid.UUID, since: datetime | None) -> None:
        self._tx.defer(_SET_REFUNDS_PENDING, (since, payment_id))

    async def requeue_refunds(self, payment_id: uuid.UUID, at: datetime) -> None:
        self._tx.defer(_REQUEUE_REFUNDS, (at, payment_id))

    async def refunds_due(self, before: datetime, limit: int) -> list[uuid.UUID]:
        cur = await self._tx.read(_REFUNDS_DUE, (before, limit))
        return [_uuid(payment_id) for (payment_id,) in await cur.fetchall()]


def _uuid(value: object) -> uuid.UUID:
    assert isinstance(value, uuid.UUID)
    return value


def _taken(booking_id: str) -> Callable[[psycopg.Error], Exception | None]:
    """A unique violation of the booking key as `BookingAlreadyClaimed(booking_id)`."""

    def translate(exc: psycopg.Error) -> Exception | None:
        if isinstance(exc, errors.UniqueViolation) and exc.diag.constraint_name == _BOOKING_KEY:
            return BookingAlreadyClaimed(booking_id)
        return None

    return translate
