"""KafkaOutboxRelay and ensure_topics against a real Kafka-protocol broker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import msgspec
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaTimeoutError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import ConsumerRecord

from payment.adapters.kafka.cloudevents import decode_record
from payment.adapters.kafka.producer import create_producer
from payment.adapters.kafka.relay import KafkaOutboxRelay
from payment.adapters.kafka.topics import Topics, ensure_topics
from payment.adapters.memory import MemoryUnitOfWork, MemoryUnitOfWorkFactory
from payment.adapters.postgres.outbox import wait_for_outbox_notification
from payment.adapters.postgres.relay_lock import RelayLeadership
from payment.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from payment.application.commands import TraceHeaders
from payment.application.messages import OutboundMessage, OutboundType
from payment.application.ports import OutboxRecord
from support.broker import client_fetch_max_wait_ms, idempotent_producer
from support.record_senders import FakeRecordQueue, Outgoing

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class UtcClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


def unique_topics() -> Topics:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    return Topics(**{field: f"{prefix}.{field}" for field in Topics.__struct_fields__})


@pytest_asyncio.fixture
async def producer(kafka_bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    p = create_producer(kafka_bootstrap, enable_idempotence=idempotent_producer())
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


async def topics_on(kafka_bootstrap: str, partitions: int = 3) -> Topics:
    topics = unique_topics()
    await ensure_topics(kafka_bootstrap, topics.names, partitions=partitions)
    return topics


async def consume(
    kafka_bootstrap: str, topics: Sequence[str], count: int, within: float = 20.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read `count` records from the start of `topics` (then briefly check for more)."""
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=kafka_bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        # Tansu answers a fetch only when this expires.
        fetch_max_wait_ms=client_fetch_max_wait_ms(),
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        async with asyncio.timeout(within):
            while len(records) < count:
                batches = await consumer.getmany(timeout_ms=200)
                for batch in batches.values():
                    records.extend(batch)
        # Anything beyond `count` would be an unwanted duplicate.
        for batch in (await consumer.getmany(timeout_ms=300)).values():
            records.extend(batch)
    finally:
        await consumer.stop()
    return records


def message(
    key: str,
    sequence: int | None,
    kind: OutboundType = "payment.initiated",
    trace: TraceHeaders = TraceHeaders(),
) -> OutboundMessage:
    return OutboundMessage(
        event_id=uuid.uuid4(),
        type=kind,
        key=key,
        subject=key if sequence is not None else None,
        sequence=sequence,
        time=datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC),
        data=f'{{"key":"{key}","version":{sequence or 0}}}'.encode(),
        trace=trace,
    )


async def add(uows: MemoryUnitOfWorkFactory, *messages: OutboundMessage) -> None:
    async with uows() as uow:
        await uow.outbox.add(messages)
        await uow.commit()


def unpublished(uows: MemoryUnitOfWorkFactory) -> list[OutboxRecord]:
    return [r for r in uows.db.outbox if r.published_at is None]


def relay_for(
    producer: AIOKafkaProducer,
    uows: MemoryUnitOfWorkFactory,
    topics: Topics,
    batch_size: int = 500,
) -> KafkaOutboxRelay:
    return KafkaOutboxRelay(
        producer,
        uows,
        topics,
        UtcClock(),
        source="payment-service-test",
        batch_size=batch_size,
        poll_interval=0.02,
        max_backoff=0.05,
    )


def headers_of(record: ConsumerRecord[bytes, bytes]) -> dict[str, bytes]:
    return dict(record.headers)


async def test_relay_publishes_rows_in_order_with_cloudevents_headers(
    kafka_bootstrap: str, producer: AIOKafkaProducer
) -> None:
    topics = await topics_on(kafka_bootstrap)
    uows = MemoryUnitOfWorkFactory()
    payment = str(uuid.uuid4())
    trace = TraceHeaders(traceparent=TRACEPARENT, tracestate="vendor=1")
    initiated = message(payment, 1, "payment.initiated", trace)
    completed = message(payment, 2, "payment.completed", trace)
    rejected = message("booking-9", None, "payment.failed")
    await add(uows, initiated)
    await add(uows, completed, rejected)

    relay = relay_for(producer, uows, topics)
    assert await relay.flush() == 3
    assert unpublished(uows) == []
    assert relay.published == 3

    records = await consume(kafka_bootstrap, [topics.initiated, topics.completed, topics.failed], 3)
    assert len(records) == 3
    by_topic = {r.topic: r for r in records}
    first, second = by_topic[topics.initiated], by_topic[topics.completed]
    assert first.key == second.key == payment.encode()
    assert first.partition == second.partition  # same key, same partition
    assert first.value == initiated.data
    assert headers_of(first) == {
        "ce_specversion": b"1.0",
        "ce_id": str(initiated.event_id).encode(),
        "ce_source": b"payment-service-test",
        "ce_type": b"payment.initiated",
        "ce_time": b"2026-03-04T05:06:07.890123Z",
        "content-type": b"application/json",
        "ce_dataschema": b"urn:payment-service:payment.initiated:1",
        "ce_subject": payment.encode(),
        "ce_sequence": b"0000000001",
        "traceparent": TRACEPARENT.encode(),
        "tracestate": b"vendor=1",
    }
    assert headers_of(second)["ce_sequence"] == b"0000000002"
    assert headers_of(second)["ce_id"] == str(completed.event_id).encode()

    failed = by_topic[topics.failed]
    assert failed.key == b"booking-9"
    assert "ce_subject" not in headers_of(failed)
    assert "ce_sequence" not in headers_of(failed)
    assert "traceparent" not in headers_of(failed)
    # What we publish, our own consumer decodes.
    assert decode_record(first).id == str(initiated.event_id)


class Killed(BaseException):
    """Stands for `kill -9`: nothing of the process runs after it."""


class CrashBeforeMark(MemoryUnitOfWorkFactory):
    """The process dies after the broker acknowledged the batch, before it was marked."""

    def __call__(self) -> MemoryUnitOfWork:
        uow = super().__call__()

        async def crash(positions: Sequence[int], at: datetime) -> None:
            raise Killed

        uow.outbox.mark_published = crash  # type: ignore[method-assign]
        return uow


async def test_rows_acknowledged_but_not_marked_are_republished_with_the_same_ce_id(
    kafka_bootstrap: str, producer: AIOKafkaProducer
) -> None:
    topics = await topics_on(kafka_bootstrap)
    crashing = CrashBeforeMark()
    payment = str(uuid.uuid4())
    await add(crashing, message(payment, 1), message(payment, 2, "payment.completed"))
    with pytest.raises(Killed):
        await relay_for(producer, crashing, topics).publish_pending()
    assert len(unpublished(crashing)) == 2

    restarted = MemoryUnitOfWorkFactory(crashing.db)
    assert await relay_for(producer, restarted, topics).flush() == 2
    assert unpublished(restarted) == []

    records = await consume(kafka_bootstrap, [topics.initiated, topics.completed], 4)
    ids = sorted(headers_of(r)["ce_id"].decode() for r in records)
    expected = sorted(str(r.message.event_id) for r in crashing.db.outbox)
    assert ids == sorted(expected * 2)  # each event exactly twice, with its own ce_id


async def test_per_key_order_holds_across_many_payments_and_partitions(
    kafka_bootstrap: str, producer: AIOKafkaProducer
) -> None:
    topics = await topics_on(kafka_bootstrap, partitions=4)
    uows = MemoryUnitOfWorkFactory()
    # Every event goes to one topic so order can be checked per partition; a small batch
    # makes streams straddle batches.
    same_topic = msgspec.structs.replace(
        topics, completed=topics.initiated, failed=topics.initiated
    )
    relay = relay_for(producer, uows, same_topic, batch_size=7)
    task = asyncio.create_task(relay.run())
    payments = [str(uuid.uuid4()) for _ in range(40)]
    versions = 4
    try:
        # Commits keep arriving while the relay runs, interleaving the payments.
        for version in range(1, versions + 1):
            for chunk in range(0, len(payments), 10):
                await add(uows, *(message(p, version) for p in payments[chunk : chunk + 10]))
                await asyncio.sleep(0.005)
        for _ in range(1500):
            if not unpublished(uows):
                break
            await asyncio.sleep(0.02)
        assert unpublished(uows) == []
    finally:
        relay.stop()
        await asyncio.wait_for(task, 5)

    records = await consume(kafka_bootstrap, [topics.initiated], len(payments) * versions)
    assert len(records) == len(payments) * versions
    partitions: dict[bytes, set[int]] = {}
    sequences: dict[bytes, list[int]] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        assert r.key is not None
        partitions.setdefault(r.key, set()).add(r.partition)
        sequences.setdefault(r.key, []).append(int(headers_of(r)["ce_sequence"]))
    assert all(len(p) == 1 for p in partitions.values())
    assert len({p for ps in partitions.values() for p in ps}) > 1  # really spread out
    # Sent in batches per partition, each key still where any Kafka client puts it.
    every = [0, 1, 2, 3]
    assert all(ps == {DefaultPartitioner()(key, every, every)} for key, ps in partitions.items())
    assert all(seqs == list(range(1, versions + 1)) for seqs in sequences.values())


class FailOnce(FakeRecordQueue):
    """A real producer whose send of chosen (key, sequence) pairs fails the first time."""

    def __init__(self, producer: AIOKafkaProducer, failing: set[tuple[str, int]]) -> None:
        self._producer = producer
        self.failing = failing

    async def deliver(self, record: Outgoing) -> object:
        assert record.key is not None
        sequence = int(dict(record.headers)["ce_sequence"] or b"0")
        if (record.key.decode(), sequence) in self.failing:
            self.failing.discard((record.key.decode(), sequence))
            raise KafkaTimeoutError()
        return await self._producer.send_and_wait(
            record.topic, value=record.value, key=record.key, headers=record.headers
        )


async def test_a_failed_send_never_lets_a_later_event_of_its_payment_overtake_it(
    kafka_bootstrap: str, producer: AIOKafkaProducer
) -> None:
    topics = await topics_on(kafka_bootstrap, partitions=2)
    uows = MemoryUnitOfWorkFactory()
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    await add(uows, message(a, 1), message(b, 1), message(a, 2), message(b, 2), message(a, 3))
    sender = FailOnce(producer, {(a, 2)})
    relay = KafkaOutboxRelay(sender, uows, topics, UtcClock(), max_backoff=0.05)

    assert await relay.publish_pending() == (5, 2)
    assert [r.message.sequence for r in unpublished(uows)] == [2, 3]
    await asyncio.sleep(0.1)  # key a backs off on its own (max_backoff=0.05)
    assert await relay.publish_pending() == (2, 0)

    records = await consume(kafka_bootstrap, [topics.initiated], 5)
    order = [
        (r.key, int(headers_of(r)["ce_sequence"]))
        for r in sorted(records, key=lambda r: (r.partition, r.offset))
    ]
    assert [s for k, s in order if k == a.encode()] == [1, 2, 3]
    assert [s for k, s in order if k == b.encode()] == [1, 2]


async def test_ensure_topics_creates_missing_topics_once(kafka_bootstrap: str) -> None:
    topics = unique_topics()
    created = await ensure_topics(kafka_bootstrap, topics.names, partitions=3)
    assert sorted(created) == sorted(topics.names)
    assert await ensure_topics(kafka_bootstrap, topics.names, partitions=3) == []

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(list(topics.names))
    finally:
        await admin.close()
    assert {t["topic"]: len(t["partitions"]) for t in described} == dict.fromkeys(topics.names, 3)


async def test_ensure_topics_tolerates_a_race_between_instances(kafka_bootstrap: str) -> None:
    names = unique_topics().names
    results = await asyncio.gather(
        *(ensure_topics(kafka_bootstrap, names, partitions=2) for _ in range(3))
    )
    created = [name for result in results for name in result]
    assert sorted(created) == sorted(names)  # each created by exactly one of them


async def test_two_relays_on_postgresql_publish_each_row_once_woken_by_notify(
    kafka_bootstrap: str,
    producer: AIOKafkaProducer,
    database_url: str,
    pg_uow_factory: PostgresUnitOfWorkFactory,
) -> None:
    # The wiring of `payment-service run`: advisory-lock leadership and LISTEN/NOTIFY.
    topics = await topics_on(kafka_bootstrap)
    waiters = [wait_for_outbox_notification(database_url) for _ in range(2)]
    leadership = RelayLeadership(database_url, retry_interval=0.05)
    relays = [
        KafkaOutboxRelay(
            producer,
            pg_uow_factory,
            topics,
            UtcClock(),
            wait_for_work=waiter,
            poll_interval=30,  # longer than the test: only a notification can wake them
            leadership=leadership,
        )
        for waiter in waiters
    ]
    tasks = [asyncio.create_task(r.run()) for r in relays]
    try:
        for _ in range(250):
            if any(r.leading for r in relays):
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # the leader is now waiting for work
        payment = str(uuid.uuid4())
        async with pg_uow_factory() as uow:
            await uow.outbox.add([message(payment, 1), message(payment, 2, "payment.completed")])
            await uow.commit()
        records = await consume(kafka_bootstrap, [topics.initiated, topics.completed], 2, within=10)
    finally:
        for r in relays:
            r.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        for waiter in waiters:
            await waiter.aclose()
    assert len(records) == 2  # one leader: no duplicates
    assert sum(r.published for r in relays) == 2
    assert [r.leading for r in relays] == [False, False]
    async with pg_uow_factory() as uow:
        assert await uow.outbox.pending(10) == []
