"""The demo orchestrator's matching and checks, over a real broker and a fake service."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from payment.adapters.kafka.cloudevents import (
    PoisonMessage,
    decode_record,
    decode_request,
    encode_outbound,
)
from payment.adapters.kafka.dead_letters import KafkaDeadLetterPublisher
from payment.adapters.kafka.producer import create_producer
from payment.adapters.kafka.topics import Topics, ensure_topics
from payment.application.messages import (
    PAYMENT_COMPLETED,
    PAYMENT_FAILED,
    PAYMENT_INITIATED,
    REQUEST_PAYMENT,
    OutboundMessage,
    OutboundType,
    PaymentCompletedMessage,
    PaymentFailedMessage,
    PaymentInitiatedMessage,
)
from payment.devtools.demo import DemoReport, run_demo
from support.broker import client_fetch_max_wait_ms, idempotent_producer
from support.waiting import eventually

pytestmark = pytest.mark.timeout(120)

_encoder = msgspec.json.Encoder()


@dataclass
class FakeServiceBehaviour:
    """How the fake service departs from the contract (by default it keeps it)."""

    # Requests whose booking id ends with one of these are silently lost.
    drop_suffixes: tuple[str, ...] = ()
    # Off: a redelivered request is handled again (and re-publishes the outcome).
    dedupe: bool = True
    # Off: a re-request re-publishes the outcome under a new ce_id.
    replay_same_id: bool = True


@dataclass
class FakeService:
    """Just enough of the contract (section 4) to answer the orchestrator: no database."""

    bootstrap: str
    topics: Topics
    behaviour: FakeServiceBehaviour
    inbox: set[tuple[str, str]] = field(default_factory=set)
    # booking id -> its terminal event, re-published for a re-request
    outcomes: dict[str, OutboundMessage] = field(default_factory=dict)

    async def run(self, ready: asyncio.Event) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=client_fetch_max_wait_ms(),
        )
        producer = create_producer(self.bootstrap, enable_idempotence=idempotent_producer())
        await consumer.start()
        await producer.start()
        try:
            # The producer fetches a topic's metadata on demand; a consumer's cluster view
            # holds only the topics it is assigned.
            partitions = [
                TopicPartition(self.topics.request, p)
                for p in sorted(await producer.partitions_for(self.topics.request))
            ]
            consumer.assign(partitions)
            # The topics are this test's own: everything on them is for us.
            await consumer.seek_to_beginning(*partitions)
            dead_letters = KafkaDeadLetterPublisher(producer, self.topics.dead_letter, "fake")
            ready.set()
            while True:
                batch = await consumer.getmany(timeout_ms=100)
                for records in batch.values():
                    for record in records:
                        await self._handle(record, producer, dead_letters)
        finally:
            await producer.stop()
            await consumer.stop()

    async def _handle(
        self,
        record: ConsumerRecord[bytes, bytes],
        producer: AIOKafkaProducer,
        dead_letters: KafkaDeadLetterPublisher,
    ) -> None:
        try:
            event = decode_record(record, expected_type=REQUEST_PAYMENT)
            request = decode_request(event.data)
        except PoisonMessage as exc:
            await dead_letters.publish(record, exc.reason)
            return
        if request.booking_id.endswith(self.behaviour.drop_suffixes or ("\0",)):
            return
        if self.behaviour.dedupe and (event.source, event.id) in self.inbox:
            return
        self.inbox.add((event.source, event.id))
        now = datetime.now(UTC)
        out: list[OutboundMessage] = []
        existing = self.outcomes.get(request.booking_id)
        if existing is not None:
            outcome = existing
            if not self.behaviour.replay_same_id:
                outcome = msgspec.structs.replace(outcome, event_id=uuid.uuid4())
            out.append(outcome)
        elif request.amount is None or request.amount < 1:
            data = PaymentFailedMessage(
                booking_id=request.booking_id,
                saga_id=request.saga_id,
                reason="invalid_request",
                detail="amount must be at least 1",
                failed_at=now,
            )
            out.append(_message(PAYMENT_FAILED, request.booking_id, None, now, data))
        else:
            payment_id = str(uuid.uuid4())
            assert request.currency is not None
            initiated = PaymentInitiatedMessage(
                payment_id=payment_id,
                booking_id=request.booking_id,
                saga_id=request.saga_id,
                amount=request.amount,
                currency=request.currency,
                customer_id=request.customer_id,
                initiated_at=now,
                version=1,
            )
            completed = PaymentCompletedMessage(
                payment_id=payment_id,
                booking_id=request.booking_id,
                saga_id=request.saga_id,
                amount=request.amount,
                currency=request.currency,
                processor="fake",
                provider_reference=f"fake_{payment_id[:8]}",
                completed_at=now,
                version=2,
            )
            outcome = _message(PAYMENT_COMPLETED, payment_id, 2, now, completed)
            self.outcomes[request.booking_id] = outcome
            out += [_message(PAYMENT_INITIATED, payment_id, 1, now, initiated), outcome]
        for message in out:
            encoded = encode_outbound(
                message, source="fake-service", topic_for=self.topics.outbound
            )
            await producer.send_and_wait(
                encoded.topic, encoded.value, key=encoded.key, headers=encoded.headers
            )


def _message(
    kind: OutboundType,
    key: str,
    version: int | None,
    at: datetime,
    data: PaymentInitiatedMessage | PaymentCompletedMessage | PaymentFailedMessage,
) -> OutboundMessage:
    return OutboundMessage(
        event_id=uuid.uuid4(),
        type=kind,
        key=key,
        subject=key if version is not None else None,
        sequence=version,
        time=at,
        data=_encoder.encode(data),
    )


@pytest.fixture
def topic_names() -> Topics:
    """Topic names of this test only, so runs never see each other's messages."""
    prefix = f"demo-test-{uuid.uuid4().hex[:8]}"
    return Topics(
        request=f"{prefix}.saga.request_payment",
        initiated=f"{prefix}.payment.initiated",
        completed=f"{prefix}.payment.completed",
        failed=f"{prefix}.payment.failed",
        dead_letter=f"{prefix}.payment.dead_letter",
        refund=f"{prefix}.saga.refund_payment",
        refunded=f"{prefix}.payment.refunded",
        refund_failed=f"{prefix}.payment.refund_failed",
    )


@pytest.fixture
async def topics(kafka_bootstrap: str, topic_names: Topics) -> Topics:
    """This test's topics, created."""
    await ensure_topics(kafka_bootstrap, topic_names.names, partitions=3)
    return topic_names


@pytest.fixture
async def fake_service(
    kafka_bootstrap: str, topics: Topics
) -> AsyncIterator[Callable[[FakeServiceBehaviour], FakeService]]:
    """Starts a fake service with the given behaviour; stopped when the test ends."""
    tasks: list[asyncio.Task[None]] = []
    started: list[FakeService] = []

    def start(behaviour: FakeServiceBehaviour) -> FakeService:
        service = FakeService(kafka_bootstrap, topics, behaviour)
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(service.run(ready)))
        started.append(service)
        return service

    yield start
    for task in tasks:
        task.cancel()
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if not isinstance(outcome, asyncio.CancelledError):
            raise AssertionError(f"fake service failed: {outcome!r}")


async def _demo(
    kafka_bootstrap: str,
    topics: Topics,
    count: int,
    timeout_s: float = 60,
    out: io.StringIO | None = None,
) -> tuple[DemoReport, str]:
    out = out or io.StringIO()
    report = await run_demo(
        kafka_bootstrap, count=count, topics=topics, timeout_s=timeout_s, out=out, settle_s=1.0
    )
    return report, out.getvalue()


async def test_a_service_keeping_the_contract_passes_every_check(
    kafka_bootstrap: str,
    topics: Topics,
    fake_service: Callable[[FakeServiceBehaviour], FakeService],
) -> None:
    fake_service(FakeServiceBehaviour())

    report, printed = await _demo(kafka_bootstrap, topics, count=25)

    assert report.problems == ()
    assert report.ok
    assert report.requests_sent == 25
    assert report.completed == 25
    assert report.failed_by_reason == {}
    assert report.no_outcome == report.conflicting_outcomes == report.missing_initiated == 0
    assert report.duplicates_sent == report.duplicates_ignored == 4
    assert report.rerequest_replayed
    assert report.invalid_rejected is True
    assert report.poison_dead_lettered is True
    assert report.dead_letters == 1
    assert report.latency_p50_ms is not None and report.latency_p99_ms is not None
    assert 0 < report.latency_p50_ms <= report.latency_p99_ms
    assert not report.timed_out
    # Not a terminal: plain progress lines, then the table.
    assert "\r" not in printed
    assert "requests sent" in printed and "OK" in printed


async def test_a_lost_request_fails_the_run(
    kafka_bootstrap: str,
    topics: Topics,
    fake_service: Callable[[FakeServiceBehaviour], FakeService],
) -> None:
    fake_service(FakeServiceBehaviour(drop_suffixes=("-7",)))

    report, printed = await _demo(kafka_bootstrap, topics, count=10, timeout_s=8)

    assert not report.ok
    assert report.timed_out
    assert report.no_outcome == 1
    assert report.completed == 9
    assert "1 request(s) got no terminal event" in report.problems
    assert "FAILED" in printed


async def test_a_service_answering_redeliveries_fails_the_duplicate_check(
    kafka_bootstrap: str,
    topics: Topics,
    fake_service: Callable[[FakeServiceBehaviour], FakeService],
) -> None:
    fake_service(FakeServiceBehaviour(dedupe=False))

    report, _ = await _demo(kafka_bootstrap, topics, count=10)

    assert not report.ok
    # This fake finishes a payment before it reads the next record, so even an
    # immediate duplicate finds it terminal and re-publishes the outcome.
    assert report.duplicates_ignored == 0
    assert report.no_outcome == 0


async def test_a_re_request_answered_under_a_new_ce_id_fails_the_replay_check(
    kafka_bootstrap: str,
    topics: Topics,
    fake_service: Callable[[FakeServiceBehaviour], FakeService],
) -> None:
    fake_service(FakeServiceBehaviour(replay_same_id=False))

    report, _ = await _demo(kafka_bootstrap, topics, count=10)

    assert not report.ok
    assert not report.rerequest_replayed
    assert report.conflicting_outcomes == 1


async def test_topics_the_service_creates_after_the_demo_started_are_listened_to(
    kafka_bootstrap: str, topic_names: Topics
) -> None:
    # As in `dev --demo`: the demo starts while the service is still creating its topics.
    out = io.StringIO()

    async def late_service() -> None:
        # The topics appear once the demo waits for them.
        await eventually(lambda: "waiting for the service to create" in out.getvalue(), 30)
        await ensure_topics(kafka_bootstrap, topic_names.names, partitions=3)
        await FakeService(kafka_bootstrap, topic_names, FakeServiceBehaviour()).run(asyncio.Event())

    service = asyncio.create_task(late_service())
    try:
        report, printed = await _demo(kafka_bootstrap, topic_names, count=10, timeout_s=30, out=out)
    finally:
        service.cancel()
        await asyncio.gather(service, return_exceptions=True)

    assert report.problems == ()
    assert report.completed == 10
    assert "waiting for the service to create" in printed
