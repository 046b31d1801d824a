"""A budget for per-message INFO lines: each of them while they are few, a count when many.

A lifecycle line (payment initiated, processor charge, payment completed, published …)
costs tens of microseconds of CPU once formatted, redacted and written: at a few hundred
payments a second that is a sizeable share of the service, and nobody reads thousands of
lines a second. Call sites ask `allow()` before logging such a line. Within each second
the first `per_second` are allowed; the rest are only counted, and one INFO line says how
many lines of which kind were left out, so the log still shows that the traffic happened
and how much of it. That summary is written by the first call of a later second, or by
`flush()`, which `run()` calls every second: when traffic stops, the last second's count
still reaches the log within a second. Warnings and errors
never go through a budget. `per_second=0` allows everything.

Traces and metrics are not affected: every payment still has its spans and its counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Final

DEFAULT_PER_SECOND: Final = 50.0

log = logging.getLogger("payment.lifecycle")


class LogBudget:
    """How many per-message INFO lines may be written this second (see the module doc)."""

    def __init__(
        self,
        per_second: float = DEFAULT_PER_SECOND,
        *,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ) -> None:
        if per_second < 0:
            raise ValueError("per_second must not be negative")
        self._limit = per_second
        self._clock = clock
        self._logger = logger
        self._window = clock()
        self._used = 0
        self._skipped: Counter[str] = Counter()
        self.skipped_total = 0

    def allow(self, kind: str) -> bool:
        """True if a line of `kind` may be written now; else it is counted as left out."""
        if not self._limit:
            return True
        now = self._clock()
        if now - self._window >= 1.0:
            self._roll(now)
        if self._used < self._limit:
            self._used += 1
            return True
        self._skipped[kind] += 1
        self.skipped_total += 1
        return False

    def flush(self) -> None:
        """Write the summary of a finished second now, if lines were left out in it."""
        if self._skipped and self._clock() - self._window >= 1.0:
            self._roll(self._clock())

    async def run(self, interval_s: float = 1.0) -> None:
        """`flush()` every `interval_s` until cancelled (the service runs it as a task)."""
        while True:
            await asyncio.sleep(interval_s)
            self.flush()

    def _roll(self, now: float) -> None:
        skipped, self._skipped = self._skipped, Counter()
        since = now - self._window
        self._window = now
        self._used = 0
        if skipped:
            self._used = 1  # the summary is a line too
            self._logger.info(
                "%d lifecycle lines left out in the last %.1f s (over %g/s): %s",
                sum(skipped.values()),
                since,
                self._limit,
                ", ".join(f"{kind} {count}" for kind, count in skipped.most_common()),
                extra={"skipped": sum(skipped.values())},
            )


UNLIMITED: Final = LogBudget(0)
