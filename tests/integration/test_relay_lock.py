"""The relay lock's session bounds and the leader's heartbeat, on a real PostgreSQL (issue 14.3).

The network-level test (a leader whose host vanishes) is test_relay_leader_vanishes.py;
these check the parts it relies on, quickly: the server-side bounds are set on the lock's
session, a healthy leader outlives `idle_session_timeout` thanks to its heartbeat, and a
leader whose session ends is interrupted with `RelayLeadershipLost`.
"""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from payment.adapters.postgres.pool import Pool
from payment.adapters.postgres.relay_lock import (
    RELAY_LOCK_KEY,
    RelayLeadership,
    RelayLeadershipLost,
    connect_lock_session,
    session_bounds,
)

# The advisory lock's bigint key as pg_locks shows it: high and low 32 bits.
_CLASSID, _OBJID = RELAY_LOCK_KEY >> 32, RELAY_LOCK_KEY & 0xFFFFFFFF


async def _holder_pid(url: str) -> int | None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid = %s AND objid = %s AND database = ("
            "   SELECT oid FROM pg_database WHERE datname = current_database())",
            (_CLASSID, _OBJID),
        )
        row = await cur.fetchone()
    return None if row is None else int(row[0])


async def test_the_lock_session_is_bounded_on_the_server(database_url: str, pg_pool: Pool) -> None:
    conn = await connect_lock_session(database_url, heartbeat_interval=5.0, dead_after=30.0)
    try:
        shown = {}
        for name in session_bounds(5.0, 30.0):
            cur = await conn.execute(
                "SELECT setting FROM pg_settings WHERE name = %s",
                (name,),
            )
            row = await cur.fetchone()
            assert row is not None, name
            shown[name] = row[0]
    finally:
        await conn.close()
    # pg_settings shows seconds for the keepalives, milliseconds for the two timeouts.
    assert shown == {
        "tcp_keepalives_idle": "5",
        "tcp_keepalives_interval": "5",
        "tcp_keepalives_count": "5",
        "tcp_user_timeout": "30000",
        "idle_session_timeout": "30000",
    }


def test_bounds_leave_room_for_the_heartbeat() -> None:
    with pytest.raises(ValueError, match="two heartbeat intervals"):
        session_bounds(5.0, 10.0)
    with pytest.raises(ValueError):
        RelayLeadership("postgresql://unused", heartbeat_interval=1.0, dead_after=1.5)


async def test_a_healthy_leader_outlives_the_idle_session_timeout(
    database_url: str, pg_pool: Pool
) -> None:
    # idle_session_timeout is 1 s: without the heartbeat the lock's session, idle while
    # the relay publishes through the pool, would be ended under a live leader.
    leadership = RelayLeadership(
        database_url, retry_interval=0.05, heartbeat_interval=0.25, dead_after=1.0
    )
    async with leadership():
        pid = await _holder_pid(database_url)
        assert pid is not None
        await asyncio.sleep(3.0)
        assert await _holder_pid(database_url) == pid


async def test_a_leader_whose_session_ends_is_interrupted(database_url: str, pg_pool: Pool) -> None:
    leadership = RelayLeadership(
        database_url, retry_interval=0.05, heartbeat_interval=0.25, dead_after=1.0
    )
    reached_the_end = False
    with pytest.raises(RelayLeadershipLost):
        async with leadership():
            pid = await _holder_pid(database_url)
            assert pid is not None
            async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c:
                await c.execute("SELECT pg_terminate_backend(%s)", (pid,))
            started = time.monotonic()
            await asyncio.sleep(30)  # interrupted by the heartbeat, not run out
            reached_the_end = True
    assert not reached_the_end
    assert time.monotonic() - started < 30
    # The task is not left cancelled: it goes on, and leads again.
    async with asyncio.timeout(10), leadership():
        assert await _holder_pid(database_url) is not None


async def test_a_stop_while_the_lock_is_lost_stays_a_cancellation(
    database_url: str, pg_pool: Pool
) -> None:
    leadership = RelayLeadership(
        database_url, retry_interval=0.05, heartbeat_interval=0.25, dead_after=1.0
    )
    entered = asyncio.Event()

    async def lead() -> None:
        async with leadership():
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(lead())
    await asyncio.wait_for(entered.wait(), 10)
    task.cancel()  # someone else's cancellation (a stop) comes first
    with pytest.raises(asyncio.CancelledError):
        await task
    # Leaving closed the session: the lock is free for the next candidate.
    async with asyncio.timeout(10), leadership():
        assert await _holder_pid(database_url) is not None
