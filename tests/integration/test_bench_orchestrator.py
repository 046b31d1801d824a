"""The load generator's orchestrator (bench/orchestrator.py) on the real broker: what it
offers, when, and which outcomes it counts."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from payment.adapters.kafka.partitioner import murmur2
from payment.adapters.kafka.topics import Topics, ensure_topics
from support.bench_scripts import load_bench_script

bench_orchestrator = load_bench_script("orchestrator")
benchlib = load_bench_script("benchlib")

PARTITIONS = 3


@dataclass(frozen=True)
class Request:
    key: bytes
    partition: int
    headers: dict[str, bytes]
    booking_id: str


class _Body(msgspec.Struct):
    booking_id: str
    amount: int
    currency: str
    payment_method: str
    saga_id: str


@contextlib.asynccontextmanager
async def responder(bootstrap: str, topics: Topics, seen: list[Request]) -> AsyncIterator[None]:
    """Stands in for the service: every request read is answered on `payment.completed`,
    after an outcome for a booking nobody asked about and one that is not JSON."""
    consumer = AIOKafkaConsumer(
        topics.request, bootstrap_servers=bootstrap, auto_offset_reset="earliest"
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await consumer.start()
    await producer.start()

    async def answer() -> None:
        async for record in consumer:
            assert record.value is not None and record.key is not None
            body = msgspec.json.decode(record.value, type=_Body)
            seen.append(
                Request(record.key, record.partition, dict(record.headers), body.booking_id)
            )
            await producer.send(topics.completed, b"not json", key=record.key)
            stray = msgspec.json.encode({"booking_id": f"stray-{body.booking_id}"})
            await producer.send(topics.completed, stray, key=record.key)
            outcome = msgspec.json.encode({"booking_id": body.booking_id, "status": "COMPLETED"})
            await producer.send(topics.completed, outcome, key=record.key)

    task = asyncio.create_task(answer())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await consumer.stop()
        await producer.stop()


async def test_requests_go_on_schedule_and_every_outcome_is_matched_once(
    kafka_bootstrap: str,
) -> None:
    run_id = uuid.uuid4().hex[:8]
    topics = benchlib.run_topics(run_id)
    await ensure_topics(
        kafka_bootstrap, [topics.request, topics.completed, topics.failed], PARTITIONS
    )
    seen: list[Request] = []
    orchestrator = bench_orchestrator.Orchestrator(kafka_bootstrap, topics, run_id, 100)
    async with orchestrator, responder(kafka_bootstrap, topics, seen):
        bookings, worst_lag = await orchestrator.offer("step", rate=100, duration_s=0.5)
        answered = await orchestrator.wait_answered(bookings, 30)

    assert bookings == [f"step-n{i}" for i in range(50)]
    assert answered == 50 and orchestrator.send_failures == 0
    assert set(orchestrator.latency) == set(bookings)  # the stray outcomes are not counted
    assert all(latency > 0 for latency in orchestrator.latency.values())
    # Open loop: request n is due 10 ms after request n - 1, whatever came back.
    due = [orchestrator.sent_at[b] for b in bookings]
    assert all(abs(later - earlier - 0.01) < 1e-6 for earlier, later in itertools.pairwise(due))
    assert worst_lag < 0.5
    assert orchestrator.last_outcome >= max(due)

    assert sorted(r.booking_id for r in seen) == sorted(bookings)
    for request in seen:
        assert request.key == request.booking_id.encode()
        # The Java client's partitioner, as the service's own producer uses.
        assert request.partition == (murmur2(request.key) & 0x7FFFFFFF) % PARTITIONS
        assert request.headers["ce_type"] == b"saga.request_payment"
        assert request.headers["ce_source"] == f"bench-e2e-{run_id}".encode()
        assert set(request.headers) == {
            "ce_specversion",
            "ce_id",
            "ce_source",
            "ce_type",
            "ce_time",
            "content-type",
        }
    assert len({r.headers["ce_id"] for r in seen}) == 50
