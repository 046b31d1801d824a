"""The relay's deliveries under way, so that a pass reads while earlier ones wait for acks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from payment.application.ports import OutboxRecord

# A key's rows in position order, as a pass hands them to a delivery.
Chains = Sequence[Sequence[OutboxRecord]]
Deliver = Callable[[Chains], Awaitable[object]]


class Deliveries:
    """Rows being sent: from the pass that read them until each is acknowledged and queued
    for its mark, or failed.

    The next passes leave these rows out (`positions()`) and hold back every other row of
    their keys (`holds`): a key's next row goes only once its predecessor was
    acknowledged, as within one pass. So rows committed while a delivery waits for the
    broker are read and sent at once instead of after it.

    A delivery started in the background (`start`) that raises is a fault of the relay's
    own (sends and marks report their errors, they do not raise): `check()` raises it in
    the pass loop, which ends the leadership term as any other error does.
    """

    def __init__(self) -> None:
        self._positions: set[int] = set()
        self._keys: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._error: BaseException | None = None

    def __len__(self) -> int:
        """Deliveries running in the background."""
        return len(self._tasks)

    def positions(self) -> set[int]:
        """The rows under way."""
        return self._positions

    def holds(self, key: str) -> bool:
        """True if a row of `key` is under way: its later rows must wait."""
        return key in self._keys

    def keys(self) -> set[str]:
        """The keys with a row under way."""
        return self._keys

    def hold(self, chains: Chains) -> Callable[[], None]:
        """Take the chains' rows and keys as under way; returns what gives them back."""
        positions = [row.position for chain in chains for row in chain]
        keys = [chain[0].message.key for chain in chains if chain]
        self._positions.update(positions)
        self._keys.update(keys)

        def release() -> None:
            self._positions.difference_update(positions)
            self._keys.difference_update(keys)

        return release

    def start(self, chains: Chains, deliver: Deliver) -> None:
        """Deliver the chains in a task of their own; they are under way from now."""
        release = self.hold(chains)

        async def delivery() -> None:
            try:
                await deliver(chains)
            except Exception as exc:  # kept for `check()`: the pass loop raises it
                if self._error is None:
                    self._error = exc
            finally:
                release()

        task = asyncio.create_task(delivery(), name="outbox-relay-delivery")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def check(self) -> None:
        """Raise the first error a background delivery ended with, once."""
        error, self._error = self._error, None
        if error is not None:
            raise error

    async def wait_one(self) -> None:
        """Until one background delivery ends (at once if none runs)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)

    async def wait_all(self) -> None:
        """Until every background delivery has ended."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def cut(self) -> None:
        """Cancel the background deliveries and wait for them: their rows stay pending, to
        be sent again (with the same `ce_id`) by whoever leads next."""
        for task in self._tasks:
            task.cancel()
        await self.wait_all()
