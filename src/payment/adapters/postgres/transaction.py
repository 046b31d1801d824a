"""The connection of one unit of work, and the transaction its writes commit in."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import psycopg
from psycopg import AsyncClientCursor, AsyncCursor
from psycopg.abc import Params, QueryNoTemplate
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow

from payment.adapters.postgres.pool import Connection
from payment.adapters.postgres.prepared_writes import SESSIONS, prepared_form

Translate = Callable[[psycopg.Error], Exception | None]


class Deferred(NamedTuple):
    """A write queued by `Transaction.defer`."""

    query: QueryNoTemplate
    params: Params | None
    translate: Translate | None


class Transaction:
    """Runs the statements of one unit of work; its adapters never hold the connection.

    Once the unit of work ends the connection goes back to the pool and may serve another
    task, so a late call must fail here rather than run inside someone else's transaction.

    What a handler pays for is statements sent, in client CPU more than in round trips:
    psycopg's async path costs 70-100 µs of CPU per statement here, and a pipeline more
    per statement than separate round trips (BEGIN, INSERT, COMMIT: 167 µs as three round
    trips, 284 µs pipelined). One message of several statements, bound on the client
    (`AsyncClientCursor`, PostgreSQL's simple query protocol), costs about one statement:
    BEGIN, three INSERTs and COMMIT in 118 µs against 340-378 µs pipelined (bench note in
    docs/performance.md). So:

    * The connection stays in autocommit mode; this class sends BEGIN and COMMIT itself.
    * Reads before the first write run outside any transaction, as prepared statements:
      no BEGIN, no COMMIT. Under READ COMMITTED every statement takes a fresh snapshot
      anyway, so they see exactly what they would inside one. A read-only unit of work
      (execute_payment's first load, the relay's `pending`) is then one statement. This
      would not hold for REPEATABLE READ, whose snapshot is the first statement's.
    * The first write opens the transaction: BEGIN and the statement go in one message.
    * A write whose result nobody waits for (`defer`: events, statuses, outbox rows) is
      not sent at once: it goes in the message of the next statement, or of the COMMIT.
      Its errors then surface from that statement or from `commit`, which the handlers
      treat alike (a lost race retries the whole unit of work). So a deferred write must
      fail by an error, never by a row count (the event store's version guard does).
    * A unit of work that only defers writes (the relay's marks, a charge's start) sends
      them in one message without BEGIN and COMMIT: PostgreSQL runs the statements of one
      simple-protocol message as one implicit transaction, all or nothing.
    * Each statement with values sent this way (the writes, and a read that follows
      them) goes as `EXECUTE` of a statement the session prepared at its first use, in
      the same message (prepared_writes.py): PostgreSQL parses and plans it once per
      session instead of once per message. Not on a pool made with
      `prepare_threshold=None` (no prepared statements at all).
    * The values are in the text PostgreSQL receives. A message that fails (a lost race
      on a stream's version, routine under concurrency) is written to the server's error
      log with them (`log_min_error_statement`, by default `error`), where prepared
      statements showed `$1`: docs/operations.md says how to keep payment data out of it.
    * Rollback is psycopg's (it also deallocates the session's prepared statements: a
      rolled-back DDL could leave them pointing at a dropped object); rollbacks are off
      the hot path (lost races, rejected duplicates).
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

        Deferred writes not sent by then never will be: they vanish with the transaction
        they would have belonged to.
        """
        conn, self._conn = self._conn, None
        self._open = False
        self._deferred.clear()
        return conn

    def _connection(self) -> Connection:
        if self._conn is None or not self._open:
            raise RuntimeError("the unit of work is not active")
        return self._conn

    async def _send_deferred(
        self, conn: Connection, then: list[Deferred], *, commit: bool = False
    ) -> AsyncCursor[TupleRow]:
        """The deferred writes and `then` in one message (see `_send`).

        The queue is emptied once every statement is bound: a value that cannot be bound
        sends nothing and leaves the deferred writes where they were.
        """
        statements = [*self._deferred, *then]
        cur = AsyncClientCursor(conn)
        # Behind a pooler that keeps no prepared statements (prepare_threshold None), none.
        preparing = conn.prepare_threshold is not None
        held = await SESSIONS.held(conn) if preparing else set()
        forms = [
            prepared_form(item.query) if preparing and item.params else None for item in statements
        ]
        prepares = SESSIONS.to_prepare(held, [form for form in forms if form is not None])
        ready = held | {form.name for form in prepares}
        texts = [
            cur.mogrify(item.query, item.params)
            if form is None or form.name not in ready
            else cur.mogrify(form.execute, item.params)
            for item, form in zip(statements, forms, strict=True)
        ]
        self._deferred = []
        try:
            result = await _send(
                cur, statements, texts, [form.prepare for form in prepares], commit=commit
            )
        except BaseException:
            SESSIONS.forget(conn)  # the PREPAREs before a failure ran; the others did not
            raise
        held.update(form.name for form in prepares)
        return result

    async def read(
        self, query: QueryNoTemplate, params: Params | None = None
    ) -> AsyncCursor[TupleRow]:
        """Run a statement that only reads (after the deferred writes: it must see them)."""
        conn = self._connection()
        if self._deferred:
            return await self._send_deferred(conn, [Deferred(query, params, None)])
        return await conn.execute(query, params)

    async def write(
        self, query: QueryNoTemplate, params: Params | None = None
    ) -> AsyncCursor[TupleRow]:
        """Run a statement that writes, inside the transaction (opened now if need be)."""
        conn = self._connection()
        if self._deferred or not _in_transaction(conn):
            return await self._send_deferred(conn, [Deferred(query, params, None)])
        return await conn.execute(query, params)

    def defer(
        self,
        query: QueryNoTemplate,
        params: Params | None = None,
        *,
        translate: Translate | None = None,
    ) -> None:
        """Queue a write whose result the caller does not wait for (see the class doc).

        `translate(error)` may turn the statement's database error into another one.
        """
        self._connection()
        self._deferred.append(Deferred(query, params, translate))

    async def commit(self) -> None:
        """Commit what was written; the transaction must not have failed."""
        conn = self._connection()
        if conn.info.transaction_status is TransactionStatus.INERROR:
            # PostgreSQL would answer COMMIT with ROLLBACK; say so instead of pretending.
            raise RuntimeError("cannot commit: an earlier statement aborted the transaction")
        if self._deferred:
            await self._send_deferred(conn, [], commit=True)
            return
        if _in_transaction(conn):
            await conn.commit()


def _in_transaction(conn: Connection) -> bool:
    return conn.info.transaction_status is not TransactionStatus.IDLE


async def _send(
    cur: AsyncClientCursor[TupleRow],
    statements: list[Deferred],
    texts: list[str],
    prepares: list[str],
    *,
    commit: bool = False,
) -> AsyncCursor[TupleRow]:
    """Send the bound statements (`texts`) in one message, inside the transaction (opened
    by this message if none is), and COMMIT after them if `commit`. The `prepares` go
    first (prepared_writes.py). Returns `cur` on the last statement's result (a read's
    rows).
    """
    begin = not _in_transaction(cur.connection)
    # Both: no BEGIN nor COMMIT; PostgreSQL runs the statements of one message as one
    # implicit transaction, committed as a whole or not at all.
    if begin and not commit:
        texts = ["BEGIN", *texts]
    elif commit and not begin:
        texts = [*texts, "COMMIT"]
    texts = [*prepares, *texts]
    try:
        await cur.execute(";\n".join(texts))
    except psycopg.Error as exc:
        for item in statements:
            if item.translate is not None and (mapped := item.translate(exc)) is not None:
                raise mapped from None
        raise
    for _ in prepares:
        _next_result(cur)  # past each PREPARE's
    if begin and not commit:
        _next_result(cur)  # past BEGIN's
    for _ in statements[1:]:
        _next_result(cur)
    return cur


def _next_result(cur: AsyncClientCursor[TupleRow]) -> None:
    # Fewer results than statements would hand a read's caller another statement's result.
    if not cur.nextset():
        raise RuntimeError("PostgreSQL answered fewer results than statements were sent")


async def finish(conn: Connection) -> None:
    """Roll back whatever `conn` left uncommitted and return it to autocommit mode.

    A connection caught mid-statement (a cancelled task) is left as it is: the pool
    discards it.
    """
    if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        SESSIONS.forget(conn)  # psycopg's rollback may DEALLOCATE ALL
        await conn.rollback()
    if conn.info.transaction_status is TransactionStatus.IDLE and not conn.autocommit:
        await conn.set_autocommit(True)
