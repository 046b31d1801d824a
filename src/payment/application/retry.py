"""Exponential backoff with full jitter: the one retry schedule of the service."""

from __future__ import annotations

import random
from collections.abc import Callable


def full_jitter(attempt: int, *, initial: float, maximum: float, rng: Callable[[], float]) -> float:
    """The wait before retry number `attempt` (1 for the first retry).

    Drawn uniformly below min(`maximum`, `initial` * 2 ** (attempt - 1)): many callers
    hit by the same outage spread their retries instead of retrying in lockstep.
    """
    ceiling: float = min(maximum, initial * (1 << max(attempt - 1, 0)))
    return ceiling * rng()


class Backoff:
    """Successive waits of one retrying caller: `next()` after each failure, `reset()`
    after a success."""

    __slots__ = ("_attempts", "_initial", "_maximum", "_rng")

    def __init__(
        self,
        *,
        initial: float = 0.1,
        maximum: float = 5.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError("backoff needs 0 < initial <= maximum")
        self._initial = initial
        self._maximum = maximum
        self._rng = rng
        self._attempts = 0

    @property
    def attempts(self) -> int:
        """Failures since the last success (or since creation)."""
        return self._attempts

    def next(self) -> float:
        """Count one more failure; the seconds to wait before trying again."""
        self._attempts += 1
        return full_jitter(
            self._attempts, initial=self._initial, maximum=self._maximum, rng=self._rng
        )

    def reset(self) -> None:
        """A success: the next failure waits the shortest again."""
        self._attempts = 0
