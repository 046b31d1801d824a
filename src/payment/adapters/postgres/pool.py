"""Connection pool and dedicated connections to the service's PostgreSQL database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeAlias

from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

Connection: TypeAlias = AsyncConnection[TupleRow]
Pool: TypeAlias = AsyncConnectionPool[Connection]


def create_pool(
    url: str,
    *,
    min_size: int = 4,
    max_size: int = 16,
    acquire_timeout: float = 30.0,
    prepare_threshold: int | None = 0,
    name: str = "payment",
) -> Pool:
    """A closed pool of autocommit connections; `await pool.open()` it.

    Autocommit because a unit of work opens its transaction only at its first write (see
    `transaction.Transaction`); it leaves every connection in that mode when done.

    `acquire_timeout`: how long a unit of work waits for a free connection before
    psycopg_pool.PoolTimeout.

    `prepare_threshold=0` makes every statement sent on its own (reads, and a write inside
    an open transaction) a server-side prepared statement from its first use: the adapters
    run a handful of fixed statements thousands of times a second. Statements sent several
    to a message are bound on the client (`transaction.Transaction`). Pass None behind a
    connection pooler that cannot keep prepared statements.
    """
    return AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=acquire_timeout,
        open=False,
        name=name,
        kwargs={"autocommit": True, "prepare_threshold": prepare_threshold},
    )


@asynccontextmanager
async def open_pool(
    url: str,
    *,
    min_size: int = 4,
    max_size: int = 16,
    acquire_timeout: float = 30.0,
    prepare_threshold: int | None = 0,
) -> AsyncIterator[Pool]:
    """An open pool for the lifetime of the block (a `Resource` for the composition root)."""
    pool = create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        acquire_timeout=acquire_timeout,
        prepare_threshold=prepare_threshold,
    )
    await pool.open(wait=True, timeout=acquire_timeout)
    try:
        yield pool
    finally:
        await pool.close()


async def connect_dedicated(url: str) -> Connection:
    """A connection outside the pool, in autocommit mode.

    For LISTEN and session-level advisory locks: both belong to the session, so they must
    never be held by a pooled connection that another task may be handed next.
    """
    return await AsyncConnection.connect(url, autocommit=True)
