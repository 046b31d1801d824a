"""What Apache Kafka does that Tansu never showed, and what the service does about it.

- the idempotent producer (the service's default) across a broker crash: every record
  once, in order per key;
- a commit from a consumer without a generation is refused while the group has members,
  accepted once it is empty, and `commit_as_member` never sends one;
- a committed offset deleted from the log (`delete_records`): the service goes on from
  the log's start, loudly (ERROR line, metrics), and handles everything after it;
- a second instance joining while requests arrive: none is missed or handled twice;
- a rebalance while the handlers of the member giving up partitions are busy for longer
  than the session timeout: the group waits for their drain (the rebalance timeout), so
  nothing is handled twice;
- an outbox row larger than the topic accepts: the other keys' rows are published, its
  own key waits, and the relay says why at ERROR.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic, RecordsToDelete
from aiokafka.errors import CommitFailedError
from dependency_injector import providers

from payment.adapters.kafka.consumer import commit_as_member
from payment.adapters.kafka.producer import create_producer
from payment.adapters.kafka.relay import KafkaOutboxRelay
from payment.adapters.kafka.topics import ensure_topics
from payment.adapters.memory import MemoryUnitOfWorkFactory
from payment.adapters.postgres.migrations import migrate
from payment.adapters.processors.fake import FakeProcessor
from payment.application.messages import OutboundMessage
from payment.bootstrap import make_container
from payment.devtools.apache_kafka import ApacheKafkaBroker
from payment.domain.processor import ChargeOutcome, ChargeRequest
from payment.service import Service
from payment.settings import Settings
from support.broker import client_fetch_max_wait_ms, is_tansu
from support.service_settings import isolated_settings, topics_of
from support.topics import unique_topics
from support.waiting import eventually

pytestmark = [
    pytest.mark.skipif(is_tansu(), reason="Apache Kafka's behaviour: runs on Apache Kafka"),
    pytest.mark.timeout(240),
]


def _request_value(booking: str) -> bytes:
    return json.dumps(
        {"booking_id": booking, "amount": 1500, "currency": "EUR", "payment_method": "pm_card"}
    ).encode()


def _headers() -> list[tuple[str, bytes]]:
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", uuid.uuid4().hex.encode()),
        ("ce_source", b"kafka-behaviour-test"),
        ("ce_type", b"saga.request_payment"),
        ("ce_time", datetime.now(UTC).isoformat().encode()),
        ("content-type", b"application/json"),
    ]


async def _send_requests(bootstrap: str, topic: str, bookings: list[str], rate: float = 0) -> None:
    producer = create_producer(bootstrap)  # the service's defaults: idempotent, acks=all
    await producer.start()
    try:
        for booking in bookings:
            await producer.send_and_wait(
                topic, _request_value(booking), key=booking.encode(), headers=_headers()
            )
            if rate:
                await asyncio.sleep(1 / rate)
    finally:
        await producer.stop()


async def _payments(database_url: str, prefix: str) -> dict[str, str]:
    """booking id -> status of this test's payments."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        rows = await (
            await conn.execute(
                "SELECT booking_id, status FROM payment_payments WHERE booking_id LIKE %s",
                (f"{prefix}%",),
            )
        ).fetchall()
    return {booking: status for booking, status in rows}


async def _charges_per_booking(database_url: str, prefix: str) -> dict[str, int]:
    """booking id -> PaymentCompleted events in its stream (a second one would be a bug)."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        rows = await (
            await conn.execute(
                "SELECT p.booking_id, count(*) FROM payment_events e"
                " JOIN payment_payments p ON p.payment_id = e.stream_id"
                " WHERE p.booking_id LIKE %s AND e.event_type = 'PaymentCompleted'"
                " GROUP BY p.booking_id",
                (f"{prefix}%",),
            )
        ).fetchall()
    return {booking: count for booking, count in rows}


class _CountingGateway:
    """The fake processor, shared by every instance of a test, counting charge calls."""

    def __init__(self, latency_ms: float = 0.0) -> None:
        self._inner = FakeProcessor(latency_ms=latency_ms)
        self.name = self._inner.name
        self.charges: Counter[uuid.UUID] = Counter()

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        self.charges[request.payment_id] += 1
        return await self._inner.charge(request)

    async def lookup(self, request: ChargeRequest) -> ChargeOutcome | None:
        return await self._inner.lookup(request)


class _Running:
    """A composed service running as a task of this event loop."""

    def __init__(self, settings: Settings, gateway: object | None = None) -> None:
        container = make_container(settings)
        container.processor.override(providers.Object(gateway or FakeProcessor()))
        self.service = Service(settings, container)
        self.task = asyncio.create_task(self.service.run())

    async def stop(self) -> None:
        self.service.stop()
        await asyncio.wait_for(self.task, 60)


@pytest.fixture
def settings_for(database_url: str, kafka_bootstrap: str) -> Iterator[object]:
    def make(prefix: str, **overrides: object) -> Settings:
        timings: dict[str, object] = {
            "kafka_session_timeout_ms": 6_000,
            "kafka_heartbeat_interval_ms": 500,
        }
        return isolated_settings(
            prefix,
            database_url=database_url,
            bootstrap=kafka_bootstrap,
            **{**timings, **overrides},
        )

    yield make


# -- the idempotent producer across a broker crash ------------------------------------------


@pytest.fixture
def private_kafka() -> Iterator[ApacheKafkaBroker]:
    with ApacheKafkaBroker() as kafka:
        yield kafka


async def test_the_idempotent_producer_keeps_every_record_once_and_in_order_across_a_crash(
    private_kafka: ApacheKafkaBroker,
) -> None:
    bootstrap = private_kafka.bootstrap_servers
    topic = f"idem-{uuid.uuid4().hex[:8]}"
    await ensure_topics(bootstrap, [topic], partitions=3)
    keys = [f"payment-{n}" for n in range(6)]
    per_key = 150
    producer = create_producer(bootstrap)
    await producer.start()
    try:
        acknowledged: list[asyncio.Future[object]] = []
        for n in range(per_key):
            for key in keys:
                # Not awaited one by one: batches are in flight when the broker dies.
                acknowledged.append(await producer.send(topic, str(n).encode(), key=key.encode()))
            if n == per_key // 3:
                await asyncio.to_thread(private_kafka.kill)
                restart = asyncio.create_task(asyncio.to_thread(private_kafka.start))
            await asyncio.sleep(0.01)
        await restart
        await asyncio.gather(*acknowledged)  # every send acknowledged, none failed
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        fetch_max_wait_ms=client_fetch_max_wait_ms(),
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(3)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        seen: dict[str, list[int]] = {key: [] for key in keys}
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for record in records:
                    assert record.key is not None and record.value is not None
                    seen[record.key.decode()].append(int(record.value))
    finally:
        await consumer.stop()
    for key in keys:
        assert seen[key] == list(range(per_key)), f"{key}: duplicates, gaps or reordering"


# -- commits without a generation ----------------------------------------------------------


async def test_a_commit_without_a_generation_is_refused_while_the_group_has_members(
    kafka_bootstrap: str,
) -> None:
    topic, group = f"gen-{uuid.uuid4().hex[:8]}", f"gen-group-{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_bootstrap, [topic], partitions=2)
    member = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False
    )
    await member.start()
    outsider = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False
    )
    await outsider.start()
    tp = TopicPartition(topic, 0)
    try:

        async def member_assigned() -> bool:
            await member.getmany(timeout_ms=100)
            return bool(member.assignment())

        await eventually(member_assigned, 30, what="the member's assignment")
        # The outsider is what a member becomes when its session expired: generation -1.
        outsider.assign([tp])
        with pytest.raises(CommitFailedError):
            await outsider.commit({tp: 7})
        # The service's commit does not even ask: no generation, no commit.
        assert await commit_as_member(outsider, {tp: 7}, timeout_s=10) is False
        assert await outsider.committed(tp) is None

        await member.stop()  # the group is empty now: a plain commit is taken
        await outsider.commit({tp: 7})
        assert await outsider.committed(tp) == 7
    finally:
        await outsider.stop()
        await member.stop()


# -- a committed offset deleted from the log ------------------------------------------------


async def test_a_committed_offset_deleted_from_the_log_is_reported_and_reading_goes_on(
    settings_for: object,
    database_url: str,
    kafka_bootstrap: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    prefix = f"trunc{uuid.uuid4().hex[:8]}"
    settings: Settings = settings_for(prefix, kafka_topic_partitions=1)  # type: ignore[operator]
    await migrate(database_url)
    await ensure_topics(kafka_bootstrap, topics_of(settings), partitions=1)
    request = TopicPartition(settings.topic_request, 0)

    first = [f"{prefix}-first-{n}" for n in range(3)]
    running = _Running(settings)
    await _send_requests(kafka_bootstrap, settings.topic_request, first)
    await eventually(
        lambda: _all_completed(database_url, prefix, first), 60, what="the first requests"
    )
    await running.stop()  # its offsets are committed on the way out

    lost = [f"{prefix}-lost-{n}" for n in range(4)]
    await _send_requests(kafka_bootstrap, settings.topic_request, lost)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        # Everything on the partition so far goes: the group's commit is now below the log.
        end = len(first) + len(lost)
        await admin.delete_records({request: RecordsToDelete(before_offset=end)})
    finally:
        await admin.close()
    after = [f"{prefix}-after-{n}" for n in range(3)]
    await _send_requests(kafka_bootstrap, settings.topic_request, after)

    caplog.set_level(logging.INFO, logger="payment.adapters.kafka.offset_reset")
    running = _Running(settings)
    try:
        await eventually(
            lambda: _all_completed(database_url, prefix, after), 60, what="requests after"
        )
        metrics = await running.service.container.metrics().render()
    finally:
        await running.stop()
    assert set(await _payments(database_url, prefix)) == set(first) | set(after)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in caplog.records]
    message = errors[0].getMessage()
    assert f"{settings.topic_request}[0] offset {len(first)}" in message
    assert f"records {len(first)}..{end - 1} were deleted" in message
    labels = f'reason="out_of_range",topic="{request.topic}"'
    assert f"payment_consumer_offset_resets_total{{{labels}}} 1" in metrics, metrics
    skipped = f'payment_consumer_records_skipped_total{{topic="{request.topic}"}} {len(lost)}'
    assert skipped in metrics, metrics


async def _all_completed(database_url: str, prefix: str, bookings: list[str]) -> bool:
    statuses = await _payments(database_url, prefix)
    return all(statuses.get(b) == "COMPLETED" for b in bookings)


# -- an instance joining while requests arrive ----------------------------------------------


async def test_an_instance_joining_while_requests_arrive_misses_none_and_doubles_none(
    settings_for: object, database_url: str, kafka_bootstrap: str
) -> None:
    prefix = f"join{uuid.uuid4().hex[:8]}"
    settings: Settings = settings_for(prefix, kafka_topic_partitions=4)  # type: ignore[operator]
    await migrate(database_url)
    await ensure_topics(kafka_bootstrap, topics_of(settings), partitions=4)
    bookings = [f"{prefix}-{n}" for n in range(300)]
    first = _Running(settings)
    second: _Running | None = None
    try:
        sending = asyncio.create_task(
            _send_requests(kafka_bootstrap, settings.topic_request, bookings, rate=150)
        )
        await asyncio.sleep(0.7)
        second = _Running(settings)  # joins mid-stream: the group rebalances
        await sending
        await eventually(
            lambda: _all_completed(database_url, prefix, bookings), 90, what="every request"
        )
        assert second.service.joined.is_set()
    finally:
        for running in (first, second):
            if running is not None:
                await running.stop()
    charges = await _charges_per_booking(database_url, prefix)
    assert set(charges) == set(bookings)
    assert set(charges.values()) == {1}


# -- a rebalance that waits for busy handlers -----------------------------------------------


async def test_a_rebalance_waits_for_handlers_busy_longer_than_the_session_timeout(
    settings_for: object, database_url: str, kafka_bootstrap: str
) -> None:
    prefix = f"drain{uuid.uuid4().hex[:8]}"
    session_timeout_ms = 3_000
    settings: Settings = settings_for(  # type: ignore[operator]
        prefix,
        kafka_topic_partitions=2,
        kafka_session_timeout_ms=session_timeout_ms,
        kafka_heartbeat_interval_ms=300,
        reconcile_after_s=600.0,  # only the consumers execute payments here
    )
    await migrate(database_url)
    await ensure_topics(kafka_bootstrap, topics_of(settings), partitions=2)
    # Each charge takes three session timeouts: the first member's drain outlasts them.
    gateway = _CountingGateway(latency_ms=3 * session_timeout_ms)
    bookings = [f"{prefix}-{n}" for n in range(20)]
    first = _Running(settings, gateway)
    second: _Running | None = None
    try:
        await asyncio.wait_for(first.service.joined.wait(), 60)
        await _send_requests(kafka_bootstrap, settings.topic_request, bookings)
        await eventually(
            lambda: sum(gateway.charges.values()) == len(bookings), 60, what="charges started"
        )
        second = _Running(settings, gateway)  # the rebalance starts while all are charging
        await eventually(
            lambda: _all_completed(database_url, prefix, bookings),
            120,
            every=0.1,
            what="every payment",
        )
        await asyncio.wait_for(second.service.joined.wait(), 60)
    finally:
        for running in (first, second):
            if running is not None:
                await running.stop()
    assert len(gateway.charges) == len(bookings)
    assert set(gateway.charges.values()) == {1}, "a payment was executed again elsewhere"


# -- an outbox row the broker refuses as too large ------------------------------------------


def _completed(key: str, sequence: int, data: bytes) -> OutboundMessage:
    return OutboundMessage(
        event_id=uuid.uuid4(),
        type="payment.completed",
        key=key,
        subject=key,
        sequence=sequence,
        time=datetime.now(UTC),
        data=data,
    )


async def test_an_outbox_row_too_large_for_its_topic_holds_back_only_its_key(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = f"big{uuid.uuid4().hex[:8]}"  # the keys of this test
    topics = unique_topics("big")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:  # an operator's limit on the topic, well below the producer's own 1 MiB
        await admin.create_topics(
            [NewTopic(topics.completed, 3, 1, topic_configs={"max.message.bytes": "4096"})]
        )
    finally:
        await admin.close()
    await ensure_topics(kafka_bootstrap, topics.names, partitions=3)
    uows = MemoryUnitOfWorkFactory()
    big = _completed(f"{prefix}-big", 2, b'{"padding":"' + b"x" * 16_384 + b'"}')
    after_big = _completed(f"{prefix}-big", 3, b"{}")
    others = [_completed(f"{prefix}-{n}", 2, b"{}") for n in range(5)]
    async with uows() as uow:
        await uow.outbox.add([big, after_big, *others])
        await uow.commit()
    producer = create_producer(kafka_bootstrap)
    await producer.start()
    try:
        relay = KafkaOutboxRelay(producer, uows, topics, _UtcClock(), source="payment-service-test")
        caplog.set_level(logging.WARNING, logger="payment.adapters.kafka.relay")
        # A few passes, as the relay makes them: a fresh topic's leader may still be moving.
        for _ in range(20):
            await relay.publish_pending()
            pending = [r.message.event_id for r in uows.db.outbox if r.published_at is None]
            if len(pending) <= 2:
                break
            await asyncio.sleep(0.2)
    finally:
        await producer.stop()
    assert pending == [big.event_id, after_big.event_id]  # its key waits, in order
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors, "the refused row was not reported"
    for error in errors:
        assert "larger than the producer or the topic accepts" in error
        assert f"key {prefix}-big" in error


class _UtcClock:
    def now(self) -> datetime:
        return datetime.now(UTC)
