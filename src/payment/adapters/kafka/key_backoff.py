"""Back-off per Kafka key: a row that keeps failing delays only the rows of its own key."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from payment.application.retry import Backoff


class KeyBackoff:
    """When each failing key may be tried again.

    A key enters at its first failure and leaves at its first success, so the table holds
    only keys failing now. Each key has its own `Backoff` (full jitter): after an outage
    of the broker, keys come due spread out rather than all at once.
    """

    def __init__(
        self,
        *,
        initial: float = 0.1,
        maximum: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._initial = initial
        self._maximum = maximum
        self._clock = clock
        self._rng = rng
        self._failing: dict[str, tuple[Backoff, float]] = {}

    def __len__(self) -> int:
        return len(self._failing)

    def failed(self, key: str) -> float:
        """Count a failure of `key`; the seconds until it may be tried again."""
        backoff, _ = self._failing.get(key) or (
            Backoff(initial=self._initial, maximum=self._maximum, rng=self._rng),
            0.0,
        )
        delay = backoff.next()
        self._failing[key] = (backoff, self._clock() + delay)
        return delay

    def succeeded(self, key: str) -> None:
        """`key` went through: its next failure waits the shortest again."""
        self._failing.pop(key, None)

    def forget_due(self, keep: set[str]) -> None:
        """Forget the keys that are due but for those in `keep`: a pass that read every
        pending row found none of theirs (another instance published them, say)."""
        now = self._clock()
        for key in [k for k, (_, due) in self._failing.items() if due <= now and k not in keep]:
            del self._failing[key]

    def waiting(self) -> set[str]:
        """The keys not to be tried now."""
        now = self._clock()
        return {key for key, (_, due) in self._failing.items() if due > now}

    def next_due_in(self) -> float | None:
        """Seconds until the earliest waiting key may be tried (0 if one may now); None
        if no key is failing."""
        if not self._failing:
            return None
        return max(0.0, min(due for _, due in self._failing.values()) - self._clock())
