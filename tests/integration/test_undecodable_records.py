"""Records the broker accepts and aiokafka cannot decode (contract 4.5, issue 14 item 1).

The records are written below the client API: record batches built with aiokafka's own
builder, bytes patched where no aiokafka producer would write them, the CRC computed
again, and sent in a raw ProduceRequest, as a Java, librdkafka or franz-go producer
could. The consumer must dead-letter what it can save, skip what it cannot with a dead
letter naming the offsets and the error, go on with the records after them, and keep
running (before the fix `run()` ended with the decoding error).

Batches compressed with any codec a Kafka producer may use (gzip, snappy, lz4, zstd) are
read and handled like any other: the codecs' library (cramjam, aiokafka's extras) is a
dependency. A codec the client cannot read is simulated by making aiokafka's check for
its library say it is missing, as it does when the library is not installed.

Runs on Apache Kafka and, with PAYMENT_TEST_BROKER=tansu, on Tansu.
"""

from __future__ import annotations

import asyncio
import json
import struct
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiokafka.codec
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import ConsumerRecord

from payment.adapters.kafka.consumer import KafkaInboxConsumer
from payment.adapters.kafka.dead_letters import KafkaDeadLetterPublisher
from payment.adapters.kafka.producer import create_producer
from payment.adapters.kafka.topics import Topics, ensure_topics
from payment.adapters.memory import MemoryUnitOfWorkFactory, SystemClock
from payment.adapters.observability.metrics import Metrics
from payment.adapters.processors.fake import FakeProcessor
from payment.application.handlers import ExecutionPolicy
from payment.application.handlers import Settings as HandlerSettings
from payment.bootstrap import is_transient
from support.broker import client_fetch_max_wait_ms, idempotent_producer
from support.waiting import eventually

pytestmark = pytest.mark.timeout(180)

GROUP = "undecodable-test"
_CRC_AT, _CRC_FROM = 17, 21  # where a v2 batch's CRC sits, and what it covers


def request_headers(ce_id: str, name: bytes = b"ce_time") -> list[tuple[bytes, bytes]]:
    return [
        (b"ce_specversion", b"1.0"),
        (b"ce_id", ce_id.encode()),
        (b"ce_source", b"raw-producer"),
        (b"ce_type", b"saga.request_payment"),
        (name, b"2026-01-02T03:04:05Z"),
        (b"content-type", b"application/json"),
    ]


def request_value(booking: str) -> bytes:
    body = {"booking_id": booking, "amount": 1000, "currency": "EUR", "payment_method": "tok_visa"}
    return json.dumps(body).encode()


Raw = tuple[bytes, bytes, list[tuple[bytes, bytes]]]  # key, value, headers as bytes


def request(booking: str, header_name: bytes = b"ce_time") -> Raw:
    return booking.encode(), request_value(booking), request_headers(booking, header_name)


def _record(delta: int, key: bytes, value: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A v2 record as bytes, header names written as they are (any bytes)."""
    body = bytearray(b"\x00") + _varint(0) + _varint(delta)  # attributes, timestamp, offset
    for part in (key, value):
        body += _varint(len(part)) + part
    body += _varint(len(headers))
    for name, header_value in headers:
        body += _varint(len(name)) + name + _varint(len(header_value)) + header_value
    return bytes(_varint(len(body)) + body)


def _varint(number: int) -> bytes:
    zigzag = (number << 1) ^ (number >> 63)
    out = bytearray()
    while True:
        byte = zigzag & 0x7F
        zigzag >>= 7
        if zigzag:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def batch(records: Sequence[Raw], *, zstd: bool = False) -> bytes:
    """A v2 record batch of `records` (header names any bytes), with a good CRC.

    aiokafka's builder lays out the batch header; the records section is replaced with
    hand-written records, compressed as a zstd frame of raw blocks if `zstd` (what a
    librdkafka producer with `compression.codec=zstd` could send).
    """
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for delta, (key, value, _) in enumerate(records):
        builder.append(delta, timestamp=1_700_000_000_000, key=key, value=value, headers=[])
    header = bytearray(builder.build()[:61])
    body = b"".join(_record(delta, *record) for delta, record in enumerate(records))
    if zstd:
        body = _zstd_raw_frame(body)
        struct.pack_into(">h", header, _CRC_FROM, 4)  # attributes: codec zstd
    buffer = header + body
    struct.pack_into(">i", buffer, 8, len(buffer) - 12)
    struct.pack_into(">I", buffer, _CRC_AT, calc_crc32c(bytes(buffer[_CRC_FROM:])))
    return bytes(buffer)


def _zstd_raw_frame(data: bytes) -> bytes:
    """A zstd frame holding `data` uncompressed: one raw block (no library needed)."""
    assert len(data) < 1 << 17
    descriptor = 0x20 | 0x80  # single segment, 4-byte content size
    frame = b"\x28\xb5\x2f\xfd" + bytes([descriptor]) + struct.pack("<I", len(data))
    block_header = (len(data) << 3) | 1  # raw block, the last one
    return frame + struct.pack("<I", block_header)[:3] + data


async def produce_raw(bootstrap: str, topic: str, batches: Sequence[bytes]) -> None:
    """Each batch in a ProduceRequest of its own to partition 0's leader."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        await client._wait_on_metadata(topic)
        leader = client.cluster.leader_for_partition(TopicPartition(topic, 0))
        for raw in batches:
            response = await client.send(
                leader, ProduceRequest(None, -1, 30_000, [(topic, [(0, raw)])])
            )
            ((_, ((_, error_code, *_),)),) = response.topics
            assert error_code == 0, f"the broker refused the batch (error {error_code})"
    finally:
        await client.close()


class Service:
    """An inbox consumer on the test's topics, with a memory database and real dead letters."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        self.uows = MemoryUnitOfWorkFactory()
        self.bootstrap = bootstrap
        self.topics = topics
        self.consumer: AIOKafkaConsumer | None = None
        self.dead_letters: KafkaDeadLetterPublisher | None = None

    async def make_consumer(self, listener: ConsumerRebalanceListener) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=GROUP + self.topics.request,
            enable_auto_commit=False,
            auto_offset_reset="none",
            fetch_max_wait_ms=client_fetch_max_wait_ms(),
        )
        consumer.subscribe([self.topics.request, self.topics.initiated], listener=listener)
        await consumer.start()
        self.consumer = consumer
        return consumer

    def inbox(self, producer: Any) -> KafkaInboxConsumer:
        self.dead_letters = KafkaDeadLetterPublisher(producer, self.topics.dead_letter, GROUP)
        return KafkaInboxConsumer(
            consumer_factory=self.make_consumer,
            request_topic=self.topics.request,
            initiated_topic=self.topics.initiated,
            uow_factory=self.uows,
            processor=FakeProcessor(),
            clock=SystemClock(),
            dead_letters=self.dead_letters,
            metrics=Metrics(),
            settings=HandlerSettings(),
            policy=ExecutionPolicy(),
            is_transient=is_transient,
        )


@pytest_asyncio.fixture
async def topics(kafka_bootstrap: str) -> Topics:
    prefix = f"undec{uuid.uuid4().hex[:10]}"
    names = Topics(**{field: f"{prefix}.{field}" for field in Topics.__struct_fields__})
    await ensure_topics(
        kafka_bootstrap, [names.request, names.initiated, names.dead_letter], partitions=1
    )
    return names


@pytest_asyncio.fixture
async def running(
    kafka_bootstrap: str, topics: Topics
) -> AsyncIterator[tuple[Service, asyncio.Task[None]]]:
    producer = create_producer(kafka_bootstrap, enable_idempotence=idempotent_producer())
    await producer.start()
    service = Service(kafka_bootstrap, topics)
    inbox = service.inbox(producer)
    task = asyncio.create_task(inbox.run())
    try:
        yield service, task
    finally:
        inbox.stop()
        await asyncio.wait([task], timeout=30)
        await producer.stop()


async def parked_one(bootstrap: str, topics: Topics) -> ConsumerRecord[bytes, bytes]:
    """The one dead letter of the test, checked to name the request topic's partition 0."""
    reader = AIOKafkaConsumer(
        topics.dead_letter,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=client_fetch_max_wait_ms(),
    )
    await reader.start()
    try:
        async with asyncio.timeout(60):
            parked: ConsumerRecord[bytes, bytes] = await reader.getone()
        assert not await reader.getmany(timeout_ms=1000), "one dead letter only"
    finally:
        await reader.stop()
    assert header(parked, "dlq_original_topic") == topics.request
    assert header(parked, "dlq_original_partition") == "0"
    return parked


def header(record: ConsumerRecord[bytes, bytes], name: str) -> str:
    return next(v for k, v in record.headers if k == name and v is not None).decode()


async def bookings_accepted(service: Service, task: asyncio.Task[None], wanted: set[str]) -> None:
    def accepted() -> bool:
        if task.done():  # run() ended: fail at once, with its error
            task.result()
            raise AssertionError("the consumer stopped")
        return wanted <= set(service.uows.db.bookings)

    await eventually(accepted, 60, what=f"bookings {sorted(wanted)} accepted")


async def test_a_header_name_that_is_not_utf8_is_dead_lettered_and_the_partition_moves_on(
    kafka_bootstrap: str, topics: Topics, running: tuple[Service, asyncio.Task[None]]
) -> None:
    service, task = running
    # One batch: a good request, one whose ce_time header name is not UTF-8 (Java and
    # librdkafka producers send any bytes there), another good one; then a later batch.
    await produce_raw(
        kafka_bootstrap,
        topics.request,
        [
            batch([request("BK-0"), request("BK-1", b"ce_t\xffme"), request("BK-2")]),
            batch([request("BK-3")]),
        ],
    )

    await bookings_accepted(service, task, {"BK-0", "BK-2", "BK-3"})
    parked = await parked_one(kafka_bootstrap, topics)

    assert "BK-1" not in service.uows.db.bookings
    assert header(parked, "dlq_original_offset") == "1"
    assert "header name not UTF-8" in header(parked, "dlq_reason")
    # Saved: key, value and headers, the name that is not UTF-8 escaped.
    assert parked.key == b"BK-1"
    assert parked.value == request_value("BK-1")
    assert ("ce_t\\xffme", b"2026-01-02T03:04:05Z") in parked.headers
    assert not task.done()


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
async def test_a_compressed_batch_is_handled_like_any_other(
    kafka_bootstrap: str, topics: Topics, running: tuple[Service, asyncio.Task[None]], codec: str
) -> None:
    service, task = running
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, compression_type=codec)
    await producer.start()
    try:
        # Sent without waiting in between: the three go in one compressed batch.
        sent = [
            await producer.send(
                topics.request,
                value,
                key=key,
                partition=0,
                headers=[(name.decode(), header_value) for name, header_value in headers],
            )
            for key, value, headers in (request(f"BK-{codec}-{n}") for n in range(3))
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()

    await bookings_accepted(service, task, {f"BK-{codec}-{n}" for n in range(3)})
    db = service.uows.db
    # Each a payment of its own, recorded with the request's amount; no dead letter.
    for n in range(3):
        (initiated, *_) = db.streams[db.bookings[f"BK-{codec}-{n}"]]
        assert initiated.amount == 1000
    assert service.dead_letters is not None and service.dead_letters.published == 0
    assert not task.done()


async def test_a_batch_in_a_codec_the_client_cannot_read_is_skipped_with_a_dead_letter(
    kafka_bootstrap: str,
    topics: Topics,
    running: tuple[Service, asyncio.Task[None]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, task = running
    # As if zstd's library were not installed: aiokafka asks this before decoding.
    monkeypatch.setattr(aiokafka.codec, "has_zstd", lambda: False)
    await produce_raw(
        kafka_bootstrap,
        topics.request,
        [
            batch([request("BK-10")]),
            batch([request("BK-11"), request("BK-12")], zstd=True),
            batch([request("BK-13")]),
        ],
    )

    await bookings_accepted(service, task, {"BK-10", "BK-13"})
    parked = await parked_one(kafka_bootstrap, topics)

    assert not {"BK-11", "BK-12"} & set(service.uows.db.bookings)
    # One dead letter for the batch, at its last offset, naming both and the error.
    assert header(parked, "dlq_original_offset") == "2"
    reason = header(parked, "dlq_reason")
    assert "offsets 1..2" in reason
    assert "zstd" in reason
    assert parked.key is None
    assert not parked.value  # nothing of the batch: it may hide card numbers
    assert not task.done()
