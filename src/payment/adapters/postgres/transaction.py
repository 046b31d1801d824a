"""The connection of one unit of work, and the transaction it opens at its first write."""

from __future__ import annotations

from psycopg import AsyncCursor
from psycopg.abc import Params, QueryNoTemplate
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow

from payment.adapters.postgres.pool import Connection


class Transaction:
    """Runs the statements of one unit of work; its adapters never hold the connection.

    Once the unit of work ends the connection goes back to the pool and may serve another
    task, so a late call must fail here rather than run inside someone else's transaction.

    Round trips are what a handler pays for (psycopg's async path costs ~100 µs of CPU per
    statement), so:

    * Reads before the first write run in autocommit mode, outside any transaction: no
      BEGIN, no COMMIT. Under READ COMMITTED every statement takes a fresh snapshot
      anyway, so they see exactly what they would inside one. A read-only unit of work
      (execute_payment's first load, the relay's `pending`) is then one round trip, not
      three. This would not hold for REPEATABLE READ, whose snapshot is the first
      statement's.
    * The first write opens the transaction (psycopg sends BEGIN once autocommit is off).
    * Commit and rollback are psycopg's. Its rollback also deallocates the session's
      prepared statements (a rolled-back DDL could leave them pointing at a dropped
      object); rollbacks are off the hot path (lost races, rejected duplicates), and a
      read-only unit of work has nothing to roll back.
    """

    __slots__ = ("_conn", "_open")

    def __init__(self) -> None:
        self._conn: Connection | None = None
        self._open = False

    async def bind(self, conn: Connection) -> None:
        """Start serving statements on `conn` (a pooled connection, now idle)."""
        if not conn.autocommit:
            await conn.set_autocommit(True)
        self._conn = conn
        self._open = True

    def detach(self) -> None:
        """Refuse further statements; the connection stays bound until `unbind`."""
        self._open = False

    def unbind(self) -> Connection | None:
        """Refuse further statements and hand the connection back (None if never bound)."""
        conn, self._conn = self._conn, None
        self._open = False
        return conn

    def _connection(self) -> Connection:
        if self._conn is None or not self._open:
            raise RuntimeError("the unit of work is not active")
        return self._conn

    async def read(
        self, query: QueryNoTemplate, params: Params | None = None
    ) -> AsyncCursor[TupleRow]:
        """Run a statement that only reads."""
        return await self._connection().execute(query, params)

    async def write(
        self, query: QueryNoTemplate, params: Params | None = None
    ) -> AsyncCursor[TupleRow]:
        """Run a statement that writes, inside the transaction (opened now if need be)."""
        conn = self._connection()
        if conn.autocommit:
            await conn.set_autocommit(False)
        return await conn.execute(query, params)

    async def commit(self) -> None:
        """Commit what was written; the transaction must not have failed."""
        conn = self._connection()
        status = conn.info.transaction_status
        if status is TransactionStatus.INERROR:
            # PostgreSQL would answer COMMIT with ROLLBACK; say so instead of pretending.
            raise RuntimeError("cannot commit: an earlier statement aborted the transaction")
        if status is TransactionStatus.INTRANS:
            await conn.commit()
        await conn.set_autocommit(True)


async def finish(conn: Connection) -> None:
    """Roll back whatever `conn` left uncommitted and return it to autocommit mode.

    A connection caught mid-statement (a cancelled task) is left as it is: the pool
    discards it.
    """
    if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        await conn.rollback()
    if conn.info.transaction_status is TransactionStatus.IDLE and not conn.autocommit:
        await conn.set_autocommit(True)
