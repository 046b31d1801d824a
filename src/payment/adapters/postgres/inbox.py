"""PostgresInbox: handled inbound messages in `payment_inbox`, keyed by CloudEvents (source, id)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from payment.adapters.postgres.rows import json_rows
from payment.adapters.postgres.transaction import Transaction

# A concurrent uncommitted mark of the same message makes this wait for that transaction:
# its commit turns this into "already handled", its rollback lets this one insert. So the
# PostgreSQL inbox never needs DuplicateMessage at commit.
_MARK = """
INSERT INTO payment_inbox (source, message_id, received_at) VALUES (%s, %s, %s)
ON CONFLICT DO NOTHING
"""

# Keys in a fixed order, so two batches sharing messages (a redelivery racing the first
# delivery) wait on each other in the same order and cannot deadlock.
_MARK_MANY = b"""
INSERT INTO payment_inbox (source, message_id, received_at)
SELECT r.source, r.message_id, %s::timestamptz
FROM json_to_recordset(%s::json) AS r(source text, message_id text)
ORDER BY r.source, r.message_id
ON CONFLICT DO NOTHING
RETURNING source, message_id
"""


class PostgresInbox:
    """The Inbox port on PostgreSQL."""

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    async def mark(self, source: str, message_id: str, at: datetime) -> bool:
        cur = await self._tx.write(_MARK, (source, message_id, at))
        return cur.rowcount == 1

    async def mark_many(
        self, keys: Sequence[tuple[str, str]], at: datetime
    ) -> set[tuple[str, str]]:
        unique = list(dict.fromkeys(keys))
        if not unique:
            return set()
        rows = json_rows([{"source": source, "message_id": mid} for source, mid in unique])
        cur = await self._tx.write(_MARK_MANY, (at, rows))
        return {(source, message_id) for source, message_id in await cur.fetchall()}
