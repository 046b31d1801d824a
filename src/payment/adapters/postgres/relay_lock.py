"""The single-relay lock: one outbox relay at a time across every instance.

`try_acquire_relay_lock` takes a session-level advisory lock on a dedicated connection:
across every instance at most one holds it, and it is released when that connection ends,
a crashed process included, so a standby's next attempt succeeds. The holder must stop
publishing as soon as that connection fails (its lock is gone then); a short overlap with
the successor is possible and harmless (publication is at least once, consumers
deduplicate by ce_id) but can reorder a payment's events while it lasts.

A leader whose host vanishes
----------------------------
A process that dies closes its connections, and the server releases the lock at once. A
host that vanishes (power, kernel panic, a network partition) sends nothing: PostgreSQL
would keep the session, and the lock, until TCP gives up on it, which for an idle
connection is the kernel's keepalive time, about two hours by default. Nobody would
publish meanwhile. So the lock's session is bounded on both ends, to `dead_after` seconds:

* Server side, set on the session: `tcp_keepalives_idle`/`_interval`/`_count` probe a
  silent client, `tcp_user_timeout` bounds how long sent data (or a probe) may go
  unacknowledged, and `idle_session_timeout` ends a session that sends no query, which
  also covers a client behind a proxy or a load balancer that keeps TCP alive for it.
  That last one would end a healthy leader's session too, since the lock itself needs no
  traffic: the leader sends a heartbeat query every `heartbeat_interval` seconds.
* Client side: libpq keepalives and `tcp_user_timeout` on the connection, and the
  heartbeat itself, which must be answered within `heartbeat_interval` seconds. A leader
  whose heartbeat fails has lost its lock (or will have, once the server gives up on
  it): the task that holds leadership is interrupted, as `asyncio.timeout` interrupts
  its block, and `RelayLeadershipLost` is raised where the block ends.

A standby that tries every `retry_interval` seconds then leads within about
`dead_after + retry_interval` seconds of the old leader's last heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final

from psycopg import AsyncConnection

from payment.adapters.postgres.pool import Connection

log = logging.getLogger(__name__)

# Arbitrary but fixed: every instance competes for the same key.
RELAY_LOCK_KEY: Final = int.from_bytes(b"pay-rlay", "big")

HEARTBEAT_INTERVAL_S: Final = 5.0
DEAD_AFTER_S: Final = 30.0


class RelayLeadershipLost(Exception):
    """The relay lock's connection failed while its holder was leading."""


async def try_acquire_relay_lock(conn: Connection) -> bool:
    """Try to become the one outbox relay across all instances; True if this session is.

    `conn` must be a dedicated connection kept open for as long as the relay publishes
    (never a pooled one: the lock belongs to the session and would travel with it). The
    lock is re-entrant per session: call this again only after `release_relay_lock`.
    """
    cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (RELAY_LOCK_KEY,))
    row = await cur.fetchone()
    return row is not None and bool(row[0])


async def release_relay_lock(conn: Connection) -> None:
    """Give up the relay role held by this session (closing the connection also does)."""
    await conn.execute("SELECT pg_advisory_unlock(%s)", (RELAY_LOCK_KEY,))


def session_bounds(heartbeat_interval: float, dead_after: float) -> dict[str, str]:
    """Server settings ending the lock's session `dead_after` seconds after its client
    went silent (see the module docstring); the client sends a query every
    `heartbeat_interval` seconds, so a live one is never taken for dead."""
    if not 0 < 2 * heartbeat_interval < dead_after:
        raise ValueError("dead_after must exceed two heartbeat intervals")
    idle = max(1, round(heartbeat_interval))
    probes = max(1, round((dead_after - idle) / idle))
    after_ms = str(round(dead_after * 1000))
    return {
        "tcp_keepalives_idle": str(idle),
        "tcp_keepalives_interval": str(idle),
        "tcp_keepalives_count": str(probes),
        "tcp_user_timeout": after_ms,
        "idle_session_timeout": after_ms,
    }


async def connect_lock_session(
    url: str, *, heartbeat_interval: float = HEARTBEAT_INTERVAL_S, dead_after: float = DEAD_AFTER_S
) -> Connection:
    """A dedicated autocommit connection bounded at both ends for holding the relay lock."""
    bounds = session_bounds(heartbeat_interval, dead_after)
    conn = await AsyncConnection.connect(
        url,
        autocommit=True,
        # libpq's side of the same bounds: this end notices a silent server too.
        keepalives=1,
        keepalives_idle=bounds["tcp_keepalives_idle"],
        keepalives_interval=bounds["tcp_keepalives_interval"],
        keepalives_count=bounds["tcp_keepalives_count"],
        tcp_user_timeout=bounds["tcp_user_timeout"],
    )
    try:
        # SET rather than startup options: connection poolers pass it through.
        for name, value in bounds.items():
            await conn.execute("SELECT set_config(%s, %s, false)", (name, value))
    except BaseException:
        await conn.close()
        raise
    return conn


class RelayLeadership:
    """The relay's `leadership`: each entry holds the relay lock on a new dedicated connection.

    Entering waits, trying every half to whole `retry_interval` (jittered), until this
    instance holds the lock; leaving (or cancellation while waiting) closes the connection,
    which releases it.
    While the block runs, a heartbeat checks the connection every `heartbeat_interval`
    seconds; if it fails, the block is interrupted and `RelayLeadershipLost` raised.
    """

    def __init__(
        self,
        url: str,
        *,
        retry_interval: float = 1.0,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
        dead_after: float = DEAD_AFTER_S,
    ) -> None:
        session_bounds(heartbeat_interval, dead_after)  # fail at construction, not later
        self._url = url
        self._retry_interval = retry_interval
        self._heartbeat_interval = heartbeat_interval
        self._dead_after = dead_after

    def __call__(self) -> AbstractAsyncContextManager[object]:
        return self._lead()

    @asynccontextmanager
    async def _lead(self) -> AsyncIterator[None]:
        conn = await connect_lock_session(
            self._url, heartbeat_interval=self._heartbeat_interval, dead_after=self._dead_after
        )
        try:
            # Polled, not a blocking pg_advisory_lock: a backend left waiting in the server
            # after this task is cancelled could take the lock and sit on it, unnoticed.
            while True:
                if await try_acquire_relay_lock(conn):
                    break
                # A poll, not a retry after a failure (no backoff: it bounds the takeover
                # time), jittered so that standbys started together do not ask in lockstep.
                await asyncio.sleep(self._retry_interval * (0.5 + random.random() / 2))
            async with _HeldLock(conn, self._heartbeat_interval):
                yield None
        finally:
            await conn.close()


class _HeldLock:
    """Heartbeats on the lock's connection while the block runs; interrupts it if one fails.

    The interruption works as `asyncio.timeout` does: the block's task is cancelled, and
    the cancellation becomes `RelayLeadershipLost` at the end of the block unless someone
    else cancelled the task too.
    """

    def __init__(self, conn: Connection, interval: float) -> None:
        self._conn = conn
        self._interval = interval
        self._task: asyncio.Task[object] | None = None
        self._inside = False
        self._lost: BaseException | None = None
        self._interrupted = False
        self._heartbeat: asyncio.Task[None] | None = None

    async def __aenter__(self) -> None:
        self._task = asyncio.current_task()
        self._inside = True
        self._heartbeat = asyncio.create_task(self._beat(), name="relay-lock-heartbeat")

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        # Before any await: from here on the heartbeat no longer interrupts the task.
        self._inside = False
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        if self._lost is None:
            return
        if self._interrupted:
            assert self._task is not None
            if self._task.uncancel() > 0 and exc_type is asyncio.CancelledError:
                return  # cancelled by someone else as well: theirs to handle
        raise RelayLeadershipLost(
            f"the relay lock's connection failed: {type(self._lost).__name__}: {self._lost}"
        ) from self._lost

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            # Not cancelled when late: psycopg would then try to cancel the query over
            # the network for seconds more. Closing the connection (on leaving) ends it.
            probe = asyncio.ensure_future(self._conn.execute("SELECT 1"))
            probe.add_done_callback(_consume)
            await asyncio.wait({probe}, timeout=self._interval)
            if probe.done() and probe.exception() is None:
                continue
            self._lost = probe.exception() if probe.done() else None
            self._lost = self._lost or TimeoutError(f"no answer within {self._interval:g} s")
            log.warning("outbox relay: leadership lost: %r", self._lost)
            if self._inside and self._task is not None:
                self._interrupted = True
                self._task.cancel()
            return


def _consume(probe: asyncio.Future[Any]) -> None:
    if not probe.cancelled():
        probe.exception()  # retrieved: a probe outlived by its heartbeat fails quietly


__all__ = [
    "DEAD_AFTER_S",
    "HEARTBEAT_INTERVAL_S",
    "RELAY_LOCK_KEY",
    "RelayLeadership",
    "RelayLeadershipLost",
    "connect_lock_session",
    "release_relay_lock",
    "session_bounds",
    "try_acquire_relay_lock",
]
