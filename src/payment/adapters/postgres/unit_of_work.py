"""PostgresUnitOfWork: one transaction on one pooled connection per handled message."""

from __future__ import annotations

from types import TracebackType
from typing import Self

import psycopg

from payment.adapters.postgres.errors import discards_connection
from payment.adapters.postgres.event_store import PostgresEventStore
from payment.adapters.postgres.inbox import PostgresInbox
from payment.adapters.postgres.outbox import PostgresOutbox
from payment.adapters.postgres.payment_index import PostgresPaymentIndex
from payment.adapters.postgres.pool import Pool
from payment.adapters.postgres.transaction import Transaction, finish
from payment.application.ports import StoresPayments


class PostgresUnitOfWork(StoresPayments):
    """The UnitOfWork port on PostgreSQL, READ COMMITTED.

    Takes a connection from the pool on enter and gives it back on exit; exit without
    `commit` rolls back. The transaction opens at the first write sent (see
    `Transaction`): everything written commits together or not at all.
    """

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._tx = Transaction()
        self._entered = False
        self._committed = False
        self.events = PostgresEventStore(self._tx)
        self.payments = PostgresPaymentIndex(self._tx)
        self.outbox = PostgresOutbox(self._tx)
        self.inbox = PostgresInbox(self._tx)

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("a unit of work is entered once; take a new one")
        self._entered = True
        conn = await self._pool.getconn()
        try:
            await self._tx.bind(conn)
        except BaseException:
            await self._pool.putconn(conn)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._tx.unbind()
        if conn is None:
            return
        try:
            if exc is not None and discards_connection(exc):
                # A read-only or departing server: a retry must reach a fresh session
                # (after a failover, the new primary), not this one again.
                await conn.close()
                return
            await finish(conn)
        except psycopg.Error:
            # The server discards an unfinished transaction with its session, and the pool
            # discards a connection it cannot reset: do not mask the error in flight.
            if exc is None:
                raise
        finally:
            await self._pool.putconn(conn)

    async def commit(self) -> None:
        if self._committed:
            raise RuntimeError("unit of work already committed")
        self._committed = True
        try:
            await self._tx.commit()
        finally:
            # Later calls through the adapters must fail, not open a new transaction; the
            # connection stays with the unit of work until exit.
            self._tx.detach()


class PostgresUnitOfWorkFactory:
    """Callable giving a fresh `PostgresUnitOfWork` on the pool (the UnitOfWorkFactory)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def __call__(self) -> PostgresUnitOfWork:
        return PostgresUnitOfWork(self.pool)
