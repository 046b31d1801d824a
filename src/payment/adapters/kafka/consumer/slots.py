"""Slots: how many messages may be in flight at once."""

from __future__ import annotations

import asyncio


class Slots:
    """A semaphore whose waits give way to a stop."""

    def __init__(self, size: int) -> None:
        self._semaphore = asyncio.Semaphore(size)

    @property
    def free(self) -> int:
        """The slots free now (typeshed declares `Semaphore._value`)."""
        return self._semaphore._value

    def locked(self) -> bool:
        return self._semaphore.locked()

    def release(self, count: int = 1) -> None:
        for _ in range(count):
            self._semaphore.release()

    async def take(self, count: int, stopping: asyncio.Event | None = None) -> bool:
        """Take `count` slots; False (none kept) once `stopping` is set."""
        taken = 0
        while taken < count and await self._one(stopping):
            taken += 1
        if taken < count:
            self.release(taken)
            return False
        return True

    async def _one(self, stopping: asyncio.Event | None) -> bool:
        """Take a slot for one more message; False (no slot taken) once stopping.

        Every slot may be held by work that cannot finish (an outage: handlers retry
        until it ends): waiting for a slot alone would keep the loop from ever reaching
        its drain, whose timeout bounds the shutdown.
        """
        if stopping is not None and stopping.is_set():
            return False
        if stopping is None or not self._semaphore.locked():
            await self._semaphore.acquire()  # free now, or no stop to give way to
            return True
        acquiring = asyncio.ensure_future(self._semaphore.acquire())
        stopped = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({acquiring, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            acquiring.cancel()  # a no-op if the slot was taken meanwhile
        try:
            await acquiring
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the loop itself is being cancelled
            return False
        if stopping.is_set():
            self._semaphore.release()
            return False
        return True
