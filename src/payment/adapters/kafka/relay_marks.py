"""Marking published outbox rows beside the relay's passes, so that no pass waits for one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import NamedTuple

log = logging.getLogger("payment.adapters.kafka.relay")

Mark = Callable[[list[int], datetime], Awaitable[None]]


class _Acknowledged(NamedTuple):
    positions: list[int]
    at: datetime


class BackgroundMarks:
    """Rows the broker acknowledged, marked published by a task of their own.

    A mark is a write, committed with `synchronous_commit` on: a round trip and a WAL
    flush. The relay's next pass reads, sends and waits for acknowledgements meanwhile.
    Until a row's mark has committed the row is still pending in the table, so the passes
    leave it out (`positions()`): it is not sent twice. A later row of the same key may go
    at once: the broker has acknowledged its predecessor.

    Batches are marked in the order they were acknowledged, one transaction each. A mark
    that fails stays queued (the rows were acknowledged: marking them later is right) and
    is tried again by the next `start()`; a crash loses the queue, and those rows are
    published again with the same `ce_id`, as after a crash between ack and mark.
    """

    def __init__(self, mark: Mark) -> None:
        self._mark = mark
        self._queue: list[_Acknowledged] = []
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        """Rows acknowledged and not marked yet."""
        return sum(len(batch.positions) for batch in self._queue)

    def positions(self) -> set[int]:
        """The rows not marked yet (passes leave them out)."""
        return {position for batch in self._queue for position in batch.positions}

    def add(self, positions: Sequence[int], at: datetime) -> None:
        """Queue an acknowledged batch, published `at`, and start marking."""
        self._queue.append(_Acknowledged(list(positions), at))
        self.start()

    def start(self) -> None:
        """Mark what is queued, unless a mark is under way (also retries after a failure)."""
        if self._queue and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._mark_queued(), name="outbox-relay-marks")

    async def settle(self) -> None:
        """Wait for the mark under way, then mark what is left here: when the relay stops
        leading, its marks must not be left to another leader (who would publish again).
        Database errors propagate; what could not be marked stays queued."""
        if self._task is not None:
            await self._task
        while self._queue:
            batch = self._queue[0]
            await self._mark(batch.positions, batch.at)
            del self._queue[0]

    async def _mark_queued(self) -> None:
        while self._queue:
            batch = self._queue[0]
            try:
                await self._mark(batch.positions, batch.at)
            except Exception as exc:  # the rows stay queued: the next pass tries again
                log.warning(
                    "outbox relay: marking %d published rows failed (%s); trying again",
                    len(batch.positions),
                    type(exc).__name__,
                )
                return
            del self._queue[0]
