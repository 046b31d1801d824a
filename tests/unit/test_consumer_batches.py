"""The consumer's batch path falling back to one by one: nothing in the batch is let go.

A batch whose handler raises (an outage, a bug) is handled again one message at a time.
Records whose envelope decodes but whose body does not are taken out of the batch before
the handler runs; they must be among those handled again, and so be dead-lettered,
rather than have their offsets move with nothing done.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import psycopg
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from payment.adapters.kafka.consumer import KafkaInboxConsumer
from payment.adapters.memory import MemoryUnitOfWork, MemoryUnitOfWorkFactory, SystemClock
from payment.adapters.metrics import Metrics
from payment.adapters.processors.fake import FakeProcessor
from payment.application.handlers import ExecutionPolicy
from payment.application.handlers import Settings as HandlerSettings

REQUESTS = "saga.request_payment"
INITIATED = "payment.initiated"
TP = TopicPartition(REQUESTS, 0)


def request_record(offset: int, value: bytes) -> ConsumerRecord[bytes, bytes]:
    headers: Sequence[tuple[str, bytes]] = [
        ("ce_specversion", b"1.0"),
        ("ce_id", f"req-{offset}".encode()),
        ("ce_source", b"saga-orchestrator"),
        ("ce_type", b"saga.request_payment"),
        ("ce_time", b"2026-01-02T03:04:05Z"),
        ("content-type", b"application/json"),
    ]
    return ConsumerRecord(
        topic=REQUESTS,
        partition=TP.partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=b"k",
        value=value,
        checksum=None,
        serialized_key_size=1,
        serialized_value_size=len(value),
        headers=list(headers),
    )


def valid(booking: str) -> bytes:
    return json.dumps(
        {"booking_id": booking, "amount": 1000, "currency": "EUR", "payment_method": "tok_visa"}
    ).encode()


class ParkedRecords:
    def __init__(self) -> None:
        self.parked: list[tuple[int, str]] = []

    async def publish(self, record: ConsumerRecord[bytes, bytes], reason: str) -> None:
        self.parked.append((record.offset, reason))


class FirstCommitFails(MemoryUnitOfWorkFactory):
    """The database drops the connection at the first commit (the batch's), then recovers."""

    failed = False

    def __call__(self) -> MemoryUnitOfWork:
        uow = super().__call__()
        if not self.failed:
            self.failed = True

            async def lost() -> None:
                raise psycopg.OperationalError("server closed the connection unexpectedly")

            uow.commit = lost  # type: ignore[method-assign]
        return uow


def consumer(uows: MemoryUnitOfWorkFactory, parked: ParkedRecords) -> KafkaInboxConsumer:
    async def no_broker(_: object) -> object:
        raise AssertionError("the batch path needs no broker")

    return KafkaInboxConsumer(
        consumer_factory=no_broker,  # type: ignore[arg-type]
        request_topic=REQUESTS,
        initiated_topic=INITIATED,
        uow_factory=uows,
        processor=FakeProcessor(),
        clock=SystemClock(),
        dead_letters=parked,
        metrics=Metrics(),
        settings=HandlerSettings(),
        policy=ExecutionPolicy(),
        transient_errors=(psycopg.OperationalError,),
    )


async def test_a_failed_batch_still_parks_its_records_with_an_undecodable_body() -> None:
    uows = FirstCommitFails()
    parked = ParkedRecords()
    wrong_type = json.dumps(
        {"booking_id": "BK-2", "amount": "1000", "currency": "EUR", "payment_method": "tok_visa"}
    ).encode()
    chunk = [
        (TP, request_record(10, valid("BK-1"))),
        (TP, request_record(11, wrong_type)),  # contract 4.5: a wrong type is undecodable
        (TP, request_record(12, valid("BK-3"))),
    ]

    await consumer(uows, parked)._handle_batch(chunk)

    assert uows.failed  # the batch's transaction did fail
    assert [offset for offset, _ in parked.parked] == [11]
    assert sorted(uows.db.bookings) == ["BK-1", "BK-3"]


async def test_a_batch_that_succeeds_parks_the_same_record_once() -> None:
    uows = MemoryUnitOfWorkFactory()
    parked = ParkedRecords()
    chunk = [
        (TP, request_record(20, valid("BK-7"))),
        (TP, request_record(21, b"{not json")),
        (TP, request_record(22, valid("BK-8"))),
    ]

    await consumer(uows, parked)._handle_batch(chunk)

    assert [offset for offset, _ in parked.parked] == [21]
    assert sorted(uows.db.bookings) == ["BK-7", "BK-8"]
