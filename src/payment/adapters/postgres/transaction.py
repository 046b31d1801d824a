"""The connection of one unit of work, as the adapters working inside it see it."""

from __future__ import annotations

from payment.adapters.postgres.pool import Connection


class Transaction:
    """Hands the unit of work's connection to its adapters while the unit of work is active.

    Adapters never keep the connection itself: once the unit of work ends, the connection
    goes back to the pool and may be serving another task, so a late call must fail here
    rather than run inside someone else's transaction.
    """

    __slots__ = ("_conn", "wrote")

    def __init__(self, conn: Connection | None = None) -> None:
        self._conn = conn
        # Whether anything was written: a read-only transaction is ended with COMMIT, which
        # unlike psycopg's rollback() keeps the connection's prepared statements.
        self.wrote = False

    def bind(self, conn: Connection) -> None:
        self._conn = conn
        self.wrote = False

    def unbind(self) -> None:
        self._conn = None

    def reader(self) -> Connection:
        """The connection, for a statement that only reads."""
        if self._conn is None:
            raise RuntimeError("the unit of work is not active")
        return self._conn

    def writer(self) -> Connection:
        """The connection, for a statement that writes."""
        conn = self.reader()
        self.wrote = True
        return conn
