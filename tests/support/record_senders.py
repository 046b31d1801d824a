"""A fake of the producer's sending side (`RecordSender`, `RecordQueue`), written once: a
test's fake says only what one send does (`deliver`) and, if it may refuse a record before
queuing it, what `send` checks first (`queue`)."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, NamedTuple

from payment.application.ports import RecordSender


class Outgoing(NamedTuple):
    """One record handed to the sender."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


# How the producer takes a send's arguments: the protocol's own signature.
_SEND = inspect.signature(RecordSender.send_and_wait)


def _outgoing(*args: Any, **kwargs: Any) -> Outgoing:
    """The record of a send, its arguments bound as `RecordSender.send_and_wait` takes them."""
    bound = _SEND.bind(None, *args, **kwargs)  # None for self
    bound.apply_defaults()
    sent = bound.arguments
    return Outgoing(sent["topic"], sent["key"], sent["value"], list(sent["headers"] or ()))


class FakeRecordQueue:
    """`send_and_wait` delivers at once; `send` checks the record (`queue` may raise, as
    aiokafka's `send` does) and hands back its delivery, run a moment later."""

    async def send_and_wait(self, *args: Any, **kwargs: Any) -> object:
        return await self.deliver(_outgoing(*args, **kwargs))

    async def send(self, *args: Any, **kwargs: Any) -> asyncio.Future[object]:
        record = _outgoing(*args, **kwargs)
        self.queue(record)
        return asyncio.ensure_future(self.deliver(record))

    async def deliver(self, record: Outgoing) -> object:
        """Send `record`; return once acknowledged, raise if refused."""
        raise NotImplementedError

    def queue(self, record: Outgoing) -> None:
        """Raise to refuse `record` before it is queued (nothing by default)."""
