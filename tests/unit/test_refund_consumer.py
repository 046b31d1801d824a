"""KafkaInboxConsumer's refund topic, without a broker: routing, the inbox, dead letters.

Refund requests are handled one by one (never batched), each through the inbox and then
settled at the gateway; an undecodable one, or one of another `ce_type`, is dead-lettered.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import msgspec
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from payment.adapters.kafka.consumer import KafkaInboxConsumer
from payment.adapters.memory import MemoryUnitOfWorkFactory, SystemClock
from payment.adapters.observability.metrics import Metrics
from payment.adapters.processors.fake import FakeProcessor
from payment.application.commands import ExecutePayment, InboundRef
from payment.application.handlers import (
    ExecutionPolicy,
    RequestPolicy,
    RequestResult,
    execute_payment,
    request_payment,
)
from payment.application.refunds import Refunds
from payment.runtime.transient import is_transient
from support.commands import request_cmd

REFUNDS = "saga.refund_payment"
TP = TopicPartition(REFUNDS, 0)


def refund_record(
    offset: int, value: bytes, *, ce_id: str | None = None, ce_type: str = REFUNDS
) -> ConsumerRecord[bytes, bytes]:
    headers: Sequence[tuple[str, bytes]] = [
        ("ce_specversion", b"1.0"),
        ("ce_id", (ce_id or f"ref-{offset}").encode()),
        ("ce_source", b"saga-orchestrator"),
        ("ce_type", ce_type.encode()),
        ("ce_time", b"2026-01-02T03:04:05Z"),
        ("content-type", b"application/json"),
    ]
    return ConsumerRecord(
        topic=REFUNDS,
        partition=TP.partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=b"BK-1",
        value=value,
        checksum=None,
        serialized_key_size=4,
        serialized_value_size=len(value),
        headers=list(headers),
    )


class Parked:
    def __init__(self) -> None:
        self.parked: list[tuple[int, str]] = []

    async def publish(self, record: ConsumerRecord[bytes, bytes], reason: str) -> None:
        self.parked.append((record.offset, reason))


def consumer(uows: MemoryUnitOfWorkFactory, gateway: FakeProcessor, parked: Parked) -> Any:
    async def connect(listener: Any) -> None:
        raise AssertionError("no broker needed")

    clock = SystemClock()
    return KafkaInboxConsumer(
        consumer_factory=connect,  # type: ignore[arg-type]
        request_topic="saga.request_payment",
        initiated_topic="payment.initiated",
        uow_factory=uows,
        processor=gateway,
        clock=clock,
        dead_letters=parked,
        metrics=Metrics(),
        request_policy=RequestPolicy(),
        policy=ExecutionPolicy(),
        is_transient=is_transient,
        refund_topic=REFUNDS,
        refunds=Refunds(uows, gateway, clock),
    )


async def _paid(uows: MemoryUnitOfWorkFactory, gateway: FakeProcessor) -> None:
    assert await request_payment(request_cmd("BK-1"), uows, SystemClock()) is (
        RequestResult.ACCEPTED
    )
    payment_id = uows.db.bookings["BK-1"]
    inbound = InboundRef(source="self", message_id="init-1")
    await execute_payment(
        ExecutePayment(inbound=inbound, payment_id=payment_id), uows, gateway, SystemClock()
    )


def _published(uows: MemoryUnitOfWorkFactory, kind: str) -> list[dict[str, Any]]:
    return [msgspec.json.decode(r.message.data) for r in uows.db.outbox if r.message.type == kind]


async def test_refund_records_are_handled_one_by_one_settled_and_deduplicated() -> None:
    uows, gateway, parked = MemoryUnitOfWorkFactory(), FakeProcessor(), Parked()
    await _paid(uows, gateway)
    inbox = consumer(uows, gateway, parked)
    body = json.dumps({"booking_id": "BK-1", "amount": 100, "saga_id": "s-1"}).encode()
    chunk = [
        (TP, refund_record(1, body, ce_id="r-1")),
        (TP, refund_record(2, body, ce_id="r-1")),  # a redelivery
        (TP, refund_record(3, body, ce_id="r-2")),
    ]

    await inbox._handle_batch(chunk)

    refunded = _published(uows, "payment.refunded")
    assert [(m["amount"], m["refunded_total"]) for m in refunded] == [(100, 100), (100, 200)]
    assert len(gateway.refunds) == 2 and parked.parked == []


async def test_an_undecodable_refund_or_one_of_another_type_is_dead_lettered() -> None:
    uows, gateway, parked = MemoryUnitOfWorkFactory(), FakeProcessor(), Parked()
    await _paid(uows, gateway)
    inbox = consumer(uows, gateway, parked)
    string_amount = json.dumps({"booking_id": "BK-1", "amount": "100"}).encode()
    valid = json.dumps({"booking_id": "BK-1"}).encode()

    await inbox._handle_batch(
        [
            (TP, refund_record(5, string_amount)),
            (TP, refund_record(6, valid, ce_type="saga.request_payment")),
        ]
    )

    assert [offset for offset, _ in parked.parked] == [5, 6]
    assert _published(uows, "payment.refunded") == [] and gateway.refunds == {}
