"""The inbox consumer on a broker stand-in: records in, offsets and dead letters out.

Drives `KafkaInboxConsumer.run` through its public seams only (the consumer factory, the
dead-letter port, the unit-of-work factory), so the failure paths it reaches are the
consumer's own, whatever the module's inside looks like.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from payment.adapters.kafka.consumer import KafkaInboxConsumer
from payment.adapters.memory import MemoryUnitOfWorkFactory, SystemClock
from payment.adapters.observability.metrics import Metrics
from payment.adapters.processors.fake import FakeProcessor
from payment.application.handlers import ExecutionPolicy, RequestPolicy
from payment.application.ports import UnitOfWorkFactory

REQUEST_TOPIC = "saga.request_payment"
INITIATED_TOPIC = "payment.initiated"
PARTITION = TopicPartition(REQUEST_TOPIC, 0)


def request(offset: int, body: bytes) -> ConsumerRecord[bytes, bytes]:
    """A `saga.request_payment` record at `offset` of PARTITION with a valid envelope."""
    envelope = {
        "ce_specversion": "1.0",
        "ce_id": f"req-{offset}",
        "ce_source": "saga-orchestrator",
        "ce_type": REQUEST_TOPIC,
        "content-type": "application/json",
    }
    headers = [(name, value.encode()) for name, value in envelope.items()]
    topic, partition = PARTITION
    # topic, partition, offset, timestamp and its type, key, value, checksum, sizes, headers
    return ConsumerRecord(topic, partition, offset, 0, 0, b"k", body, None, 1, len(body), headers)


def booking(booking_id: str) -> bytes:
    return json.dumps(
        {"booking_id": booking_id, "amount": 500, "currency": "EUR", "payment_method": "tok"}
    ).encode()


class QueueBroker:
    """AIOKafkaConsumer's part the inbox uses: hands out what is queued, records commits.

    No pause/resume: the inbox pauses requests only past its request room (192 in flight
    by default), more than these tests send."""

    def __init__(self, *records: ConsumerRecord[bytes, bytes]) -> None:
        self.queue: asyncio.Queue[ConsumerRecord[bytes, bytes]] = asyncio.Queue()
        for record in records:
            self.queue.put_nowait(record)
        self.commits: list[int] = []

    async def getmany(self, timeout_ms: int = 0, max_records: int = 0) -> dict[Any, Any]:
        try:
            async with asyncio.timeout(timeout_ms / 1000):
                records = [await self.queue.get()]
        except TimeoutError:
            return {}
        while not self.queue.empty():
            records.append(self.queue.get_nowait())
        return {PARTITION: records}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(offsets[PARTITION])

    async def stop(self) -> None:
        pass


class ScriptedDeadLetters:
    """The dead-letter port: raises the scripted errors in turn, then parks."""

    def __init__(self, *errors: Exception) -> None:
        self._errors = list(errors)
        self.attempts = 0
        self.parked: list[tuple[int, str]] = []

    async def publish(self, record: ConsumerRecord[bytes, bytes], reason: str) -> None:
        self.attempts += 1
        if self._errors:
            raise self._errors.pop(0)
        self.parked.append((record.offset, reason))


def outage_only(exc: BaseException) -> bool:
    """The service's view of transient errors, as far as these tests need it."""
    return isinstance(exc, psycopg.OperationalError)


# Retries in milliseconds, commits every 10 ms: failure paths run through in a moment.
QUICK = {"retry_initial_s": 0.001, "retry_max_s": 0.005, "commit_interval_s": 0.01}


@asynccontextmanager
async def running_inbox(
    broker: QueueBroker,
    dead_letters: ScriptedDeadLetters,
    uows: UnitOfWorkFactory | None = None,
    *,
    is_transient: Callable[[BaseException], bool] = outage_only,
    **options: float,
) -> AsyncIterator[KafkaInboxConsumer]:
    """A running consumer of PARTITION; stopped and drained on exit."""

    async def join(listener: Any) -> QueueBroker:
        await listener.on_partitions_assigned({PARTITION})
        return broker

    inbox = KafkaInboxConsumer(
        consumer_factory=join,  # type: ignore[arg-type]
        request_topic=REQUEST_TOPIC,
        initiated_topic=INITIATED_TOPIC,
        uow_factory=uows or MemoryUnitOfWorkFactory(),
        processor=FakeProcessor(),
        clock=SystemClock(),
        dead_letters=dead_letters,
        metrics=Metrics(),
        request_policy=RequestPolicy(),
        policy=ExecutionPolicy(),
        is_transient=is_transient,
        **options,  # type: ignore[arg-type]
    )
    task = asyncio.create_task(inbox.run())
    try:
        yield inbox
    finally:
        inbox.stop()
        async with asyncio.timeout(40):  # past the drain's 30 s
            await task
