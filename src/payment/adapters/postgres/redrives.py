"""PostgresRedriveLedger: which dead letters were re-driven, so none is re-driven twice."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Final, Self

import msgspec
from psycopg import AsyncConnection

from payment.adapters.postgres.pool import Connection

_REDRIVEN: Final = """
SELECT dlq_partition, dlq_offset, redriven_partition, redriven_offset, redriven_at
FROM payment_dead_letter_redrives
WHERE dlq_topic = %s
"""

# A concurrent claim of the same dead letter waits here for the holder's transaction: its
# commit turns this into "already re-driven", its rollback lets this one insert.
_CLAIM: Final = """
INSERT INTO payment_dead_letter_redrives
    (dlq_topic, dlq_partition, dlq_offset, original_topic, original_partition, original_offset)
VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT DO NOTHING
"""

_DONE: Final = """
UPDATE payment_dead_letter_redrives SET redriven_partition = %s, redriven_offset = %s
WHERE dlq_topic = %s AND dlq_partition = %s AND dlq_offset = %s
"""


class Redriven(msgspec.Struct, frozen=True, kw_only=True):
    """A dead letter re-driven earlier, and where its copy went."""

    partition: int | None
    offset: int | None
    at: datetime


class Claim:
    """The right to re-drive one dead letter, held until its transaction ends."""

    def __init__(self, conn: Connection, key: tuple[str, int, int]) -> None:
        self._conn = conn
        self._key = key

    async def done(self, partition: int, offset: int) -> None:
        """Record where the re-published copy went (committed when the claim ends)."""
        await self._conn.execute(_DONE, (partition, offset, *self._key))


class PostgresRedriveLedger:
    """`payment_dead_letter_redrives` on one dedicated connection (an operator's tool)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    @classmethod
    @asynccontextmanager
    async def connect(cls, url: str) -> AsyncIterator[Self]:
        async with await AsyncConnection.connect(url, autocommit=True) as conn:
            yield cls(conn)

    async def redriven(self, dlq_topic: str) -> dict[tuple[int, int], Redriven]:
        """Every dead letter of `dlq_topic` re-driven so far, by (partition, offset)."""
        cur = await self._conn.execute(_REDRIVEN, (dlq_topic,))
        return {
            (int(p), int(o)): Redriven(partition=rp, offset=ro, at=at)
            for p, o, rp, ro, at in await cur.fetchall()
        }

    @asynccontextmanager
    async def claim(
        self,
        dlq_topic: str,
        dlq_partition: int,
        dlq_offset: int,
        *,
        original_topic: str,
        original_partition: int | None,
        original_offset: int | None,
    ) -> AsyncIterator[Claim | None]:
        """A `Claim` on the dead letter, or None if it was re-driven already.

        The claim commits when the block ends normally and rolls back if it raises: a
        re-drive whose publication failed leaves no trace and can be tried again.
        """
        key = (dlq_topic, dlq_partition, dlq_offset)
        async with self._conn.transaction():
            cur = await self._conn.execute(
                _CLAIM, (*key, original_topic, original_partition, original_offset)
            )
            yield Claim(self._conn, key) if cur.rowcount == 1 else None
