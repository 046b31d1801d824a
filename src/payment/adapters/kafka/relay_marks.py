"""Marking published outbox rows beside the relay's passes, so that no pass waits for one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import NamedTuple

from payment.adapters.observability.log_budget import UNLIMITED, LogBudget

log = logging.getLogger("payment.adapters.kafka.relay")


class Acknowledged(NamedTuple):
    """Rows the broker acknowledged together, published `at`."""

    positions: list[int]
    at: datetime


# Marks acknowledged batches, all in one transaction; raises if it could not.
Mark = Callable[[Sequence[Acknowledged]], Awaitable[None]]


class BackgroundMarks:
    """Rows the broker acknowledged, marked published by a task of their own.

    A mark is a write, committed with `synchronous_commit` on: a round trip and a WAL
    flush. The relay's next pass reads, sends and waits for acknowledgements meanwhile.
    Until a row's mark has committed the row is still pending in the table, so the passes
    leave it out (`positions()`): it is not sent twice. A later row of the same key may go
    at once: the broker has acknowledged its predecessor.

    One task marks at a time, everything queued when it starts in one transaction. A mark
    that fails stays queued (the rows were acknowledged: marking them later is right) and
    is tried again by the next `start()`; a crash loses the queue, and those rows are
    published again with the same `ce_id`, as after a crash between ack and mark.
    """

    def __init__(self, mark: Mark, log_budget: LogBudget = UNLIMITED) -> None:
        self._mark = mark
        self._budget = log_budget
        self._queue: list[Acknowledged] = []
        self._task: asyncio.Task[bool] | None = None

    def __len__(self) -> int:
        """Rows acknowledged and not marked yet."""
        return sum(len(batch.positions) for batch in self._queue)

    def positions(self) -> set[int]:
        """The rows not marked yet (passes leave them out)."""
        return {position for batch in self._queue for position in batch.positions}

    def add(self, positions: Sequence[int], at: datetime) -> None:
        """Queue an acknowledged batch, published `at`, and start marking."""
        self._queue.append(Acknowledged(list(positions), at))
        self.start()

    def start(self) -> None:
        """Mark what is queued, unless a mark is under way (also retries after a failure)."""
        if self._queue and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._mark_queued(), name="outbox-relay-marks")

    async def settle(self) -> bool:
        """Mark everything queued (the task's way, one mark at a time); False if a mark
        failed, the rest then still queued. When the relay stops leading its marks must
        not be left to another leader, who would publish those rows again."""
        while self._queue:
            self.start()
            assert self._task is not None
            if not await self._task:
                return False
        return True

    async def _mark_queued(self) -> bool:
        while self._queue:
            batches = list(self._queue)
            try:
                await self._mark(batches)
            except Exception as exc:  # the task's outermost handler: kept for a retry
                if self._budget.allow("marks failed"):
                    log.warning(
                        "outbox relay: marking %d published rows failed (%s); trying again",
                        sum(len(batch.positions) for batch in batches),
                        type(exc).__name__,
                    )
                return False
            del self._queue[: len(batches)]
        return True
