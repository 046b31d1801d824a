"""PostgresInbox: handled inbound messages in `payment_inbox`, keyed by CloudEvents (source, id)."""

from __future__ import annotations

from datetime import datetime

from payment.adapters.postgres.transaction import Transaction

# A concurrent uncommitted mark of the same message makes this wait for that transaction:
# its commit turns this into "already handled", its rollback lets this one insert. So the
# PostgreSQL inbox never needs DuplicateMessage at commit.
_MARK = """
INSERT INTO payment_inbox (source, message_id, received_at) VALUES (%s, %s, %s)
ON CONFLICT DO NOTHING
"""


class PostgresInbox:
    """The Inbox port on PostgreSQL."""

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    async def mark(self, source: str, message_id: str, at: datetime) -> bool:
        cur = await self._tx.write(_MARK, (source, message_id, at))
        return cur.rowcount == 1
