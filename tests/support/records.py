"""Broker records for tests that run without a broker: a consumed record, and a producer
that keeps what it is asked to send."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

Headers = Sequence[tuple[str, bytes | None]]


class ConsumedRecord(NamedTuple):
    """A record as a consumer hands it over (what `ports.ConsumedRecord` reads)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers


class SentRecord(NamedTuple):
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


class RecordingSender:
    """A `ports.RecordSender` whose every record goes through `accept`: by default the record
    is acknowledged at once and kept in `sent`. A test fake overrides `accept` to fail or
    wait first, without repeating the producer's signatures."""

    def __init__(self) -> None:
        self.sent: list[SentRecord] = []

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: Headers | None = None,
    ) -> object:
        return await self.accept(SentRecord(topic, key, value, list(headers or ())))

    async def accept(self, record: SentRecord) -> object:
        """Acknowledge `record`; returns what `send_and_wait` returns."""
        self.sent.append(record)
        return None
