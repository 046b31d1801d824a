"""A fake of aiokafka's batch API (`create_batch`, `send_batch`, `partitions_for`): what the
relay's rounds use when the producer offers it (`partition_batches.BatchingProducer`)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from aiokafka.errors import KafkaTimeoutError, ProducerClosed

from support.record_senders import FakeRecordQueue, Outgoing

PARTITIONS = {"payments.initiated": {0, 1, 2, 3, 4, 5}, "payments.completed": {0, 1, 2}}


class Batch:
    """A batch builder that takes up to `capacity` records (aiokafka's: up to a size)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.records: list[tuple[bytes, bytes, list[tuple[str, bytes]]]] = []

    def append(self, *, timestamp: Any, key: bytes, value: bytes, headers: Any) -> object:
        if len(self.records) >= self.capacity:
            return None
        self.records.append((key, value, headers))
        return object()


class BatchingFake(FakeRecordQueue):
    """Takes whole batches; `send` (one record) is counted apart.

    A queued batch's acknowledgement waits for `ack_all()`, or comes at once with
    `acks_at_once`. A partition in `stuck` never takes a batch (the broker away: aiokafka
    queues one batch per partition at a time, and the one before has not gone).
    """

    def __init__(
        self,
        capacity: int = 100,
        *,
        partitions: Mapping[str, set[int]] = PARTITIONS,
        acks_at_once: bool = False,
    ) -> None:
        self.capacity = capacity
        self.partitions = partitions
        self.acks_at_once = acks_at_once
        self.batches: list[tuple[str, int, Batch, asyncio.Future[object]]] = []
        self.one_by_one: list[Outgoing] = []
        self.missing_topics: set[str] = set()
        self.refuse_batches = False
        self.stuck: set[int] = set()

    def create_batch(self) -> Batch:
        return Batch(self.capacity)

    async def send_batch(self, batch: Batch, topic: str, *, partition: int) -> Any:
        if self.refuse_batches:
            raise ProducerClosed()
        if partition in self.stuck:
            await asyncio.Event().wait()
        ack: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self.batches.append((topic, partition, batch, ack))
        if self.acks_at_once:
            ack.set_result(None)
        return ack

    async def partitions_for(self, topic: str) -> set[int]:
        if topic in self.missing_topics:
            raise KafkaTimeoutError()
        return self.partitions[topic]

    async def deliver(self, record: Outgoing) -> object:
        self.one_by_one.append(record)
        return None

    def ack_all(self) -> None:
        for *_, ack in self.batches:
            if not ack.done():
                ack.set_result(None)

    def keys(self) -> list[bytes]:
        """The keys of every queued batch, in the order they were queued."""
        return [key for _, _, batch, _ in self.batches for key, _, _ in batch.records]
