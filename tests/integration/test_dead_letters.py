"""KafkaDeadLetterPublisher against a real Kafka-protocol broker: original bytes plus dlq_*."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from payment.adapters.kafka.cloudevents import PoisonMessage, decode_record, decode_request
from payment.adapters.kafka.dead_letters import KafkaDeadLetterPublisher
from payment.adapters.kafka.producer import create_producer
from payment.adapters.kafka.topics import ensure_topics
from support.broker import client_fetch_max_wait_ms, idempotent_producer


@pytest_asyncio.fixture
async def producer(kafka_bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    p = create_producer(kafka_bootstrap, enable_idempotence=idempotent_producer())
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


async def read_one(kafka_bootstrap: str, topic: str) -> ConsumerRecord[bytes, bytes]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=client_fetch_max_wait_ms(),
    )
    await consumer.start()
    try:
        async with asyncio.timeout(20):
            record: ConsumerRecord[bytes, bytes] = await consumer.getone()
            return record
    finally:
        await consumer.stop()


async def topics_of_this_test(kafka_bootstrap: str, *, partitions: int) -> tuple[str, str]:
    """A request topic and a dead-letter topic no other test uses, created."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    source, dead_letters = f"{prefix}.request", f"{prefix}.dead_letter"
    await ensure_topics(kafka_bootstrap, [source, dead_letters], partitions=partitions)
    return source, dead_letters


def poison_reason(record: ConsumerRecord[bytes, bytes]) -> str:
    """Why the consumer would dead-letter `record` (which must be poison)."""
    try:
        decode_request(decode_record(record).data)
    except PoisonMessage as exc:
        return exc.reason
    raise AssertionError("the record should be poison")


async def test_dead_letter_keeps_original_bytes_and_headers_and_adds_dlq_headers(
    kafka_bootstrap: str, producer: AIOKafkaProducer
) -> None:
    source, dead_letters = await topics_of_this_test(kafka_bootstrap, partitions=3)
    value = b'{"booking_id": 42, "junk": "\xff\xfe"}'  # not even UTF-8
    original_headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"req-7"),
        ("ce_source", b"orchestrator"),
        ("ce_type", b"saga.request_payment"),
        ("x-binary", b"\x00\x01\xff"),
        ("x-repeated", b"one"),
        ("x-repeated", b"two"),
        ("dlq_reason", b"a stale reason from an earlier dead-lettering"),
    ]
    await producer.send_and_wait(source, value=value, key=b"booking-7", headers=original_headers)
    poisoned = await read_one(kafka_bootstrap, source)
    reason = poison_reason(poisoned)

    publisher = KafkaDeadLetterPublisher(producer, dead_letters, "payment-service-test")
    await publisher.publish(poisoned, reason)
    assert publisher.published == 1

    parked = await read_one(kafka_bootstrap, dead_letters)
    assert parked.key == b"booking-7"
    assert parked.value == value
    assert list(parked.headers) == [
        *[h for h in original_headers if h[0] != "dlq_reason"],
        ("dlq_reason", reason.encode()),
        ("dlq_original_topic", source.encode()),
        ("dlq_original_partition", str(poisoned.partition).encode()),
        ("dlq_original_offset", str(poisoned.offset).encode()),
        ("dlq_consumer_group", b"payment-service-test"),
    ]
    assert reason == "saga.request_payment data: Expected `str`, got `int` - at `$.booking_id`"


async def test_dead_letter_of_a_record_without_key_or_headers(
    kafka_bootstrap: str, producer: AIOKafkaProducer
) -> None:
    source, dead_letters = await topics_of_this_test(kafka_bootstrap, partitions=1)
    await producer.send_and_wait(source, value=b"x" * (70 * 1024))
    poisoned = await read_one(kafka_bootstrap, source)

    publisher = KafkaDeadLetterPublisher(producer, dead_letters, "group-x")
    await publisher.publish(poisoned, "value exceeds 65536 bytes")

    parked = await read_one(kafka_bootstrap, dead_letters)
    assert parked.key is None
    assert parked.value == b"x" * (70 * 1024)
    assert dict(parked.headers) == {
        "dlq_reason": b"value exceeds 65536 bytes",
        "dlq_original_topic": source.encode(),
        "dlq_original_partition": b"0",
        "dlq_original_offset": b"0",
        "dlq_consumer_group": b"group-x",
    }


async def test_a_poison_request_carrying_a_card_number_is_parked_masked(
    kafka_bootstrap: str, producer: AIOKafkaProducer
) -> None:
    source, dead_letters = await topics_of_this_test(kafka_bootstrap, partitions=1)
    # Undecodable (the amount is a string), with a card number as payment method.
    value = (
        b'{"booking_id": "booking-8", "amount": "100", "currency": "EUR",'
        b' "payment_method": "4242 4242 4242 4242", "junk": "\xff"}'
    )
    original_headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"req-8"),
        ("ce_source", b"orchestrator"),
        ("ce_type", b"saga.request_payment"),
        ("x-pan", b"4242-4242-4242-4242"),
    ]
    await producer.send_and_wait(
        source, value=value, key=b"card-4242424242424242", headers=original_headers
    )
    poisoned = await read_one(kafka_bootstrap, source)
    reason = poison_reason(poisoned)

    await KafkaDeadLetterPublisher(producer, dead_letters, "group-card").publish(poisoned, reason)

    parked = await read_one(kafka_bootstrap, dead_letters)
    assert parked.key == b"card-[REDACTED CARD]"
    assert parked.value == value.replace(b"4242 4242 4242 4242", b"[REDACTED CARD]")
    assert list(parked.headers) == [
        *original_headers[:4],
        ("x-pan", b"[REDACTED CARD]"),
        ("dlq_reason", reason.encode()),
        ("dlq_original_topic", source.encode()),
        ("dlq_original_partition", b"0"),
        ("dlq_original_offset", b"0"),
        ("dlq_consumer_group", b"group-card"),
        ("dlq_card_numbers_masked", b"value,key,headers"),
    ]
    assert b"4242" not in (parked.value or b"") + (parked.key or b"")
    assert reason == "saga.request_payment data: Expected `int | null`, got `str` - at `$.amount`"
