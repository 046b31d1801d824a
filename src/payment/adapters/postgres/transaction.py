"""The connection of one unit of work, and the transaction it opens at its first write."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import psycopg
from psycopg import AsyncCursor
from psycopg.abc import Params, QueryNoTemplate
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow

from payment.adapters.postgres.pool import Connection

Check = Callable[[AsyncCursor[TupleRow]], None]
Translate = Callable[[psycopg.Error], Exception | None]


class Deferred(NamedTuple):
    """A write queued by `Transaction.defer`."""

    query: QueryNoTemplate
    params: Params | None
    check: Check | None
    translate: Translate | None


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
    * The first write opens the transaction: psycopg sends BEGIN once autocommit is off,
      pipelined with the statement (one round trip, not two).
    * A write whose result nobody waits for (`defer`: events, statuses, outbox rows) is
      not sent at once: it goes with the next statement, or in one pipeline with the
      COMMIT. Its errors then surface from that statement or from `commit`, which the
      handlers treat alike (a lost race retries the whole unit of work). A deferred write
      with a `check` of its result is flushed, checked, and only then committed.
    * Commit and rollback are psycopg's. Its rollback also deallocates the session's
      prepared statements (a rolled-back DDL could leave them pointing at a dropped
      object); rollbacks are off the hot path (lost races, rejected duplicates), and a
      read-only unit of work has nothing to roll back.
    """

    __slots__ = ("_conn", "_deferred", "_open")

    def __init__(self) -> None:
        self._conn: Connection | None = None
        self._open = False
        self._deferred: list[Deferred] = []

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
        """Refuse further statements and hand the connection back (None if never bound).

        Deferred writes not flushed by then were never sent: they vanish with the
        transaction they would have belonged to.
        """
        conn, self._conn = self._conn, None
        self._open = False
        self._deferred.clear()
        return conn

    def _connection(self) -> Connection:
        if self._conn is None or not self._open:
            raise RuntimeError("the unit of work is not active")
        return self._conn

    async def _caught_up(self) -> Connection:
        """The connection, the deferred writes sent first: what runs next must see them."""
        conn = self._connection()
        if self._deferred:
            await self._flush(conn)
        return conn

    async def read(
        self, query: QueryNoTemplate, params: Params | None = None
    ) -> AsyncCursor[TupleRow]:
        """Run a statement that only reads (after the deferred writes: it must see them)."""
        conn = await self._caught_up()
        return await conn.execute(query, params)

    async def write(
        self, query: QueryNoTemplate, params: Params | None = None
    ) -> AsyncCursor[TupleRow]:
        """Run a statement that writes, inside the transaction (opened now if need be)."""
        conn = await self._caught_up()
        if conn.autocommit:
            await conn.set_autocommit(False)
            # BEGIN and the statement in one round trip.
            [cur] = await _pipelined(conn, [(query, params)], commit=False)
            return cur
        return await conn.execute(query, params)

    def defer(
        self,
        query: QueryNoTemplate,
        params: Params | None = None,
        *,
        check: Check | None = None,
        translate: Translate | None = None,
    ) -> None:
        """Queue a write whose result the caller does not wait for (see the class doc).

        `check(cursor)` may raise once its result is known, before anything commits;
        `translate(error)` may turn the statement's database error into another one.
        """
        self._connection()
        self._deferred.append(Deferred(query, params, check, translate))

    async def _flush(self, conn: Connection, *, commit: bool = False) -> None:
        deferred, self._deferred = self._deferred, []
        if conn.autocommit:
            await conn.set_autocommit(False)
        try:
            cursors = await _pipelined(
                conn, [(item.query, item.params) for item in deferred], commit=commit
            )
        except psycopg.Error as exc:
            for item in deferred:
                if item.translate is not None and (mapped := item.translate(exc)) is not None:
                    raise mapped from None
            raise
        for item, cur in zip(deferred, cursors, strict=True):
            if item.check is not None:
                item.check(cur)

    async def commit(self) -> None:
        """Commit what was written; the transaction must not have failed."""
        conn = self._connection()
        if conn.info.transaction_status is TransactionStatus.INERROR:
            # PostgreSQL would answer COMMIT with ROLLBACK; say so instead of pretending.
            raise RuntimeError("cannot commit: an earlier statement aborted the transaction")
        if self._deferred:
            if any(item.check is not None for item in self._deferred):
                await self._flush(conn)
            else:
                # The deferred writes and the COMMIT in one round trip.
                await self._flush(conn, commit=True)
        if conn.info.transaction_status is TransactionStatus.INTRANS:
            await conn.commit()
        await conn.set_autocommit(True)


async def _pipelined(
    conn: Connection, statements: list[tuple[QueryNoTemplate, Params | None]], *, commit: bool
) -> list[AsyncCursor[TupleRow]]:
    """Send the statements (and COMMIT) in one pipeline; their cursors, or the first error.

    The error is taken inside the pipeline block and raised after it: raised from inside,
    psycopg would also log the pipeline's own "aborted" error on the way out.
    """
    cursors: list[AsyncCursor[TupleRow]] = []
    error: psycopg.Error | None = None
    try:
        async with conn.pipeline() as pipeline:
            try:
                for query, params in statements:
                    cursors.append(await conn.execute(query, params))
                if commit:
                    await conn.commit()
                else:
                    await pipeline.sync()
            except psycopg.Error as exc:
                error = exc
    except psycopg.Error as exc:  # "pipeline aborted", after the error above
        error = error or exc
    if error is not None:
        raise error
    return cursors


async def finish(conn: Connection) -> None:
    """Roll back whatever `conn` left uncommitted and return it to autocommit mode.

    A connection caught mid-statement (a cancelled task) is left as it is: the pool
    discards it.
    """
    if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        await conn.rollback()
    if conn.info.transaction_status is TransactionStatus.IDLE and not conn.autocommit:
        await conn.set_autocommit(True)
