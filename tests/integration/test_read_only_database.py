"""A database that turns read-only (a failover, a maintenance switch) is waited out.

The real PostgreSQL is switched to `default_transaction_read_only` while requests arrive
(its sessions are terminated, so the pool reconnects and every new session is read-only),
left so for longer than a handler error is retried, then switched back without touching
the sessions again: the units of work must drop the read-only sessions themselves. No
request is dead-lettered, and every one is handled once the database is writable again.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from payment.adapters.postgres.pool import Pool
from payment.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from payment.runtime.transient import is_transient
from support.inbox import QueueBroker, ScriptedDeadLetters, booking, request, running_inbox

BEFORE, DURING = 10, 30
READ_ONLY_FOR_S = 4.0  # well past the ~1.5 s a handler error used to be retried


async def _switch(server_url: str, database: str, *, read_only: bool, terminate: bool) -> None:
    async with await psycopg.AsyncConnection.connect(server_url, autocommit=True) as admin:
        await admin.execute(
            sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = {}").format(
                sql.Identifier(database), sql.SQL("on" if read_only else "off")
            )
        )
        if terminate:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )


async def _bookings(pool: Pool) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM payment_payments")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def test_requests_during_a_read_only_window_wait_and_all_complete(
    pg_pool: Pool, database_url: str, postgres_server_url: str
) -> None:
    database = urlsplit(database_url).path.lstrip("/")
    feed = QueueBroker()
    parked = ScriptedDeadLetters()
    uows = PostgresUnitOfWorkFactory(pg_pool)

    async with running_inbox(feed, parked, uows, is_transient=is_transient, retry_max_s=1.0):
        for offset in range(BEFORE):
            feed.queue.put_nowait(request(offset, booking(f"BK-{offset}")))
        deadline = asyncio.get_running_loop().time() + 10
        while await _bookings(pg_pool) < BEFORE:
            assert asyncio.get_running_loop().time() < deadline, "requests before the switch"
            await asyncio.sleep(0.05)

        await _switch(postgres_server_url, database, read_only=True, terminate=True)
        try:
            for offset in range(BEFORE, BEFORE + DURING):
                feed.queue.put_nowait(request(offset, booking(f"BK-{offset}")))
                await asyncio.sleep(READ_ONLY_FOR_S / DURING)
            # Nothing could be written meanwhile, and nothing was given up on.
            assert await _read_only_count(pg_pool) == BEFORE
            assert parked.parked == []
        finally:
            # The sessions are left alone: the read-only ones must be dropped by the
            # units of work that meet their refusal.
            await _switch(postgres_server_url, database, read_only=False, terminate=False)

        deadline = asyncio.get_running_loop().time() + 30
        while await _bookings(pg_pool) < BEFORE + DURING:
            assert asyncio.get_running_loop().time() < deadline, "requests after the switch"
            await asyncio.sleep(0.1)
        assert parked.parked == []


async def _read_only_count(pool: Pool) -> int:
    """The bookings count, read through the pool's (read-only) sessions."""
    for _ in range(20):
        try:
            return await _bookings(pool)
        except psycopg.OperationalError:
            await asyncio.sleep(0.05)  # a terminated session the pool had not noticed
    return await _bookings(pool)
