"""Work done in rounds until cancelled: the loop of the reconciler and the refund worker."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext

# Entered around the work on one payment: where an adapter opens a trace span.
Scope = Callable[[uuid.UUID], AbstractAsyncContextManager[object]]


def no_scope(payment_id: uuid.UUID) -> AbstractAsyncContextManager[object]:
    return nullcontext()


class Rounds:
    """A worker that does a round of work (`run_once`) every `interval_s` until cancelled,
    counting in `actions` what each payment came to."""

    def __init__(self, name: str, interval_s: float, log: logging.Logger) -> None:
        self._name = name
        self._interval_s = interval_s
        self._log = log
        self.actions: dict[str, int] = {}

    def count(self, action: str) -> None:
        self.actions[action] = self.actions.get(action, 0) + 1

    async def run_once(self) -> int:
        """One round; returns how many payments it tried."""
        raise NotImplementedError

    async def run(self) -> None:
        """Loop until cancelled; an error in one round is logged and the next round tries again."""
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the outermost loop: log, count, keep going
                self.count("error")
                self._log.exception("%s: round failed; retrying next interval", self._name)
            await asyncio.sleep(self._interval_s)
