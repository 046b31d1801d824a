"""What /health/ready answers: what start-up is doing, then the checks of a running
instance (database, broker, the age limits and the backlog), each "ok" or why not."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from payment.adapters.kafka.consumer import KafkaInboxConsumer
from payment.adapters.postgres.monitoring import DatabaseStats, read_stats
from payment.settings import Settings

Checks = Callable[[], Awaitable[dict[str, str]]]


class Readiness:
    """ "starting: …" until every component is up, then the running instance's checks."""

    def __init__(self) -> None:
        self.starting = "starting: opening HTTP"
        self._checks: Checks | None = None

    def announce(self, step: str) -> None:
        """Start-up moved on to `step` (what /health/ready says meanwhile)."""
        self.starting = step

    def running(self, checks: Checks) -> None:
        """Every component is up: from now on the checks answer."""
        self._checks = checks

    async def __call__(self) -> dict[str, str]:
        if self._checks is None:
            return {"startup": self.starting}
        return await self._checks()


def readiness_limits(stats: DatabaseStats, settings: Settings) -> dict[str, str]:
    """The age checks of /health/ready: "ok", or why not (a limit of 0 turns one off)."""
    checks: dict[str, str] = {}
    for name, age, limit, what in (
        ("outbox", stats.outbox_oldest_age_s, settings.ready_max_outbox_age_s, "unpublished row"),
        (
            "in_flight",
            stats.in_flight_oldest_age_s,
            settings.ready_max_in_flight_age_s,
            "in-flight payment",
        ),
    ):
        if limit > 0:
            checks[name] = (
                "ok" if age <= limit else f"oldest {what} is {age:.0f}s old (limit {limit:g}s)"
            )
    return checks


def backlog_check(waiting: int, limit: int) -> dict[str, str]:
    """The backlog check of /health/ready: work waiting (consumer lag, requests held at
    the door, payments accepted and not yet charged) against `limit` (0 turns it off)."""
    if limit <= 0:
        return {}
    if waiting <= limit:
        return {"backlog": "ok"}
    return {"backlog": f"{waiting} messages or payments waiting (limit {limit})"}


@dataclass(frozen=True, slots=True)
class RunningChecks:
    """The checks of a running instance. The database and broker checks run side by side,
    and the backlog query only when the database answered: during an outage the answer
    (503) comes within one 2 s timeout, not after three of them in a row."""

    settings: Settings
    control_pool: Any
    producer: Any
    consumer: KafkaInboxConsumer

    async def __call__(self) -> dict[str, str]:
        s = self.settings
        (database, in_flight), broker, waiting = await asyncio.gather(
            self._database(), self._broker(), self._consumer_backlog()
        )
        backlog: dict[str, str] = {}
        if s.ready_max_backlog > 0 and "backlog" not in database:
            backlog = (
                {"backlog": "unknown (consumer lag)"}
                if waiting is None
                # Accepted and not yet charged counts too: the executor's queue.
                else backlog_check(waiting + in_flight, s.ready_max_backlog)
            )
        return {"database": database.pop("database"), **broker, **database, **backlog}

    async def _database(self) -> tuple[dict[str, str], int]:
        """The database's checks, and how many payments are in flight (0 if unread)."""
        s = self.settings
        checks: dict[str, str] = {}
        try:
            async with asyncio.timeout(2.0), self.control_pool.connection() as conn:
                await conn.execute("SELECT 1")
            checks["database"] = "ok"
        except Exception as exc:  # any failure means "not ready"
            checks["database"] = f"unavailable ({type(exc).__name__})"
            return checks, 0
        if (
            s.ready_max_outbox_age_s > 0
            or s.ready_max_in_flight_age_s > 0
            or s.ready_max_backlog > 0
        ):
            try:
                async with asyncio.timeout(2.0):
                    stats = await read_stats(self.control_pool)
                checks.update(readiness_limits(stats, s))
                return checks, stats.in_flight
            except Exception as exc:  # any failure means "not ready"
                checks["backlog"] = f"unknown ({type(exc).__name__})"
        return checks, 0

    async def _broker(self) -> dict[str, str]:
        try:
            async with asyncio.timeout(2.0):
                await self.producer.client.fetch_all_metadata()
            return {"broker": "ok"}
        except Exception as exc:  # any failure means "not ready"
            return {"broker": f"unavailable ({type(exc).__name__})"}

    async def _consumer_backlog(self) -> int | None:
        """Messages fetched or waiting on the broker, not handled yet (None: unknown)."""
        try:
            async with asyncio.timeout(2.0):
                lags = await self.consumer.lag()
        except Exception:  # any failure means "not ready"
            return None
        return sum(lags.values()) + self.consumer.backlog
