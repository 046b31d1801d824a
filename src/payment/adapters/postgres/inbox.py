"""PostgresInbox: handled inbound messages in `payment_inbox`, keyed by CloudEvents (source, id)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import psycopg
from psycopg import errors

from payment.adapters.postgres.rows import json_rows
from payment.adapters.postgres.transaction import Transaction
from payment.application.errors import DuplicateMessage

# A concurrent uncommitted mark of the same message makes this wait for that transaction:
# its commit turns this into "already handled", its rollback lets this one insert. So
# `mark` and `mark_many` never need DuplicateMessage at commit (`mark_new` does).
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


# mark_new: no ON CONFLICT, so a duplicate is an error and the unit of work can go in one
# message; a concurrent uncommitted mark makes it wait, then fail or go ahead, as above.
_MARK_NEW = """
INSERT INTO payment_inbox (source, message_id, received_at) VALUES (%s, %s, %s)
"""

_MARK_MANY_NEW = b"""
INSERT INTO payment_inbox (source, message_id, received_at)
SELECT r.source, r.message_id, %s::timestamptz
FROM json_to_recordset(%s::json) AS r(source text, message_id text)
ORDER BY r.source, r.message_id
"""

_INBOX_KEY = "payment_inbox_pkey"


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

    async def mark_new(self, keys: Sequence[tuple[str, str]], at: datetime) -> None:
        unique = list(dict.fromkeys(keys))
        if len(unique) == 1:
            (source, message_id), *_ = unique
            self._tx.defer(_MARK_NEW, (source, message_id, at), translate=_duplicate)
        elif unique:
            rows = json_rows([{"source": source, "message_id": mid} for source, mid in unique])
            self._tx.defer(_MARK_MANY_NEW, (at, rows), translate=_duplicate)


def _duplicate(exc: psycopg.Error) -> Exception | None:
    """A unique violation of the inbox's key: a message handled before."""
    if isinstance(exc, errors.UniqueViolation) and exc.diag.constraint_name == _INBOX_KEY:
        return DuplicateMessage("message already handled")
    return None
