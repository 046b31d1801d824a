"""One holder at a time per key (a payment, a refund), with no lock left behind."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Hashable
from typing import Generic, TypeVar

_K = TypeVar("_K", bound=Hashable)


class KeyedLocks(Generic[_K]):
    """An asyncio lock per key, created on first use and dropped when its last user leaves.

    A gateway that ignores idempotency keys needs look-up-then-create to run one at a
    time per payment (or refund) in this process; the map stays as small as the calls
    in flight.
    """

    def __init__(self) -> None:
        # key -> (its lock, how many calls hold or wait for it)
        self._locks: dict[_K, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, key: _K) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
