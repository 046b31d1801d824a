"""Read side of `payment-service review list`: payments flagged for review, still open."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Final

import msgspec
from psycopg import AsyncConnection

# Flagged and not terminal: what a human still has to resolve (payment_review_pending).
_OPEN_REVIEWS: Final = """
SELECT p.payment_id, p.booking_id, f.occurred_at, f.data->>'detail',
       (i.data->>'amount')::bigint, i.data->>'currency'
FROM payment_payments p
JOIN payment_events f
  ON f.stream_id = p.payment_id AND f.event_type = 'PaymentFlaggedForReview'
JOIN payment_events i
  ON i.stream_id = p.payment_id AND i.version = 1
WHERE p.status = 'INITIATED'
ORDER BY f.occurred_at, p.payment_id
"""


class OpenReview(msgspec.Struct, frozen=True, kw_only=True):
    """A payment flagged for review and not resolved yet."""

    payment_id: uuid.UUID
    booking_id: str
    flagged_at: datetime
    detail: str
    amount: int
    currency: str


async def open_reviews(url: str) -> list[OpenReview]:
    """Every payment waiting for a human, oldest flag first."""
    async with await AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(_OPEN_REVIEWS)
        return [
            OpenReview(
                payment_id=row[0],
                booking_id=row[1],
                flagged_at=row[2],
                detail=row[3] or "",
                amount=int(row[4]),
                currency=str(row[5]),
            )
            for row in await cur.fetchall()
        ]
