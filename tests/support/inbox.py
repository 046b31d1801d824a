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
from payment.application.handlers import ExecutionPolicy
from payment.application.handlers import Settings as HandlerSettings
from payment.application.ports import UnitOfWorkFactory

REQUEST_TOPIC = "saga.request_payment"
INITIATED_TOPIC = "payment.initiated"
PARTITION = TopicPartition(REQUEST_TOPIC, 0)


def request(offset: int, body: bytes) -> ConsumerRecord[bytes, bytes]:
    """A `saga.request_payment` record at `offset` of PARTITION with a valid envelope."""
    envelope = {
        "ce_specversion": "1.0",
        "ce_id": f"failure-path-{offset}",
        "ce_source": "saga-orchestrator",
        "ce_type": REQUEST_TOPIC,
        "content-type": "application/json",
    }
    return ConsumerRecord(
        topic=PARTITION.topic,
        partition=PARTITION.partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=b"booking",
        value=body,
        checksum=None,
        serialized_key_size=7,
        serialized_value_size=len(body),
        headers=[(name, value.encode()) for name, value in envelope.items()],
    )


def booking(booking_id: str) -> bytes:
    return json.dumps(
        {"booking_id": booking_id, "amount": 500, "currency": "EUR", "payment_method": "tok"}
    ).encode()


class OneFetchBroker:
    """AIOKafkaConsumer's part the inbox uses: hands out `records` once, records commits."""

    def __init__(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        self._records = records
        self.commits: list[int] = []

    async def getmany(self, timeout_ms: int = 0, max_records: int = 0) -> dict[Any, Any]:
        fetched, self._records = self._records, []
        if not fetched:
            await asyncio.sleep(timeout_ms / 1000)
        return {PARTITION: fetched} if fetched else {}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(offsets[PARTITION])

    async def stop(self) -> None:
        pass

    def pause(self, *partitions: TopicPartition) -> None:
        pass

    def resume(self, *partitions: TopicPartition) -> None:
        pass

    def paused(self) -> set[TopicPartition]:
        return set()


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


@asynccontextmanager
async def running_inbox(
    broker: OneFetchBroker,
    dead_letters: ScriptedDeadLetters,
    uows: UnitOfWorkFactory | None = None,
    *,
    is_transient: Callable[[BaseException], bool] = outage_only,
) -> AsyncIterator[KafkaInboxConsumer]:
    """A running consumer of PARTITION; stopped and drained on exit."""

    async def join(listener: Any) -> OneFetchBroker:
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
        settings=HandlerSettings(),
        policy=ExecutionPolicy(),
        is_transient=is_transient,
        retry_initial_s=0.001,
        retry_max_s=0.005,
        commit_interval_s=0.01,
    )
    task = asyncio.create_task(inbox.run())
    try:
        yield inbox
    finally:
        inbox.stop()
        async with asyncio.timeout(10):
            await task
