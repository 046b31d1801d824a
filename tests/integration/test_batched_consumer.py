"""The consumer's batch path through the composed service: a backlog handled in batches keeps
the contract message by message (duplicates, poison, invalid, conflicting re-requests) and
each outcome stays in the trace of its own request.

The requests are on the topic before the service starts, so its first fetches return many
records of one topic: those go through the batch handlers (application/batches.py).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord
from dependency_injector import providers
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from payment.adapters.kafka.producer import create_producer
from payment.adapters.kafka.topics import ensure_topics
from payment.adapters.processors.fake import FakeProcessor
from payment.bootstrap import make_container
from payment.service import Service
from support.broker import client_fetch_max_wait_ms, idempotent_producer
from support.service_settings import isolated_settings, topics_of

pytestmark = pytest.mark.timeout(180)

BOOKINGS = 60


def _headers(ce_id: str, traceparent: str | None) -> list[tuple[str, bytes]]:
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", ce_id.encode()),
        ("ce_source", b"saga-orchestrator-test"),
        ("ce_type", b"saga.request_payment"),
        ("ce_time", datetime.now(UTC).isoformat().encode()),
        ("content-type", b"application/json"),
    ]
    if traceparent:
        headers.append(("traceparent", traceparent.encode()))
    return headers


def _header(record: ConsumerRecord[bytes, bytes], name: str) -> str | None:
    for key, value in record.headers:
        if key == name and value is not None:
            return value.decode()
    return None


def _data(record: ConsumerRecord[bytes, bytes]) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(record.value or b"{}")
    return decoded


async def test_a_backlog_is_handled_in_batches_message_by_message(
    database_url: str, kafka_bootstrap: str
) -> None:
    prefix = f"batch{uuid.uuid4().hex[:10]}"
    settings = isolated_settings(
        prefix,
        database_url=database_url,
        bootstrap=kafka_bootstrap,
        kafka_enable_idempotence=idempotent_producer(),
        kafka_topic_partitions=3,
    )
    topics = topics_of(settings)
    await ensure_topics(kafka_bootstrap, topics, partitions=3)

    # The backlog: new bookings, each with its own trace; a redelivery of one of them; a
    # second request (new ce_id) for a booking; an invalid one; a poison message.
    producer = create_producer(kafka_bootstrap, enable_idempotence=idempotent_producer())
    await producer.start()
    traces: dict[str, str] = {}
    try:
        for n in range(BOOKINGS):
            booking = f"bk-{prefix}-n{n}"
            trace_id = uuid.uuid4().hex
            traces[booking] = trace_id
            value = {
                "booking_id": booking,
                "amount": 1000 + n,
                "currency": "EUR",
                "payment_method": "pm_card_visa",
            }
            ce_id = f"req-{n}"
            parent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
            await producer.send(
                settings.topic_request,
                value=json.dumps(value).encode(),
                key=booking.encode(),
                headers=_headers(ce_id, parent),
            )
            if n == 3:  # redelivered: same ce_id
                await producer.send(
                    settings.topic_request,
                    value=json.dumps(value).encode(),
                    key=booking.encode(),
                    headers=_headers(ce_id, parent),
                )
            if n == 5:  # same booking, new ce_id: no second payment
                await producer.send(
                    settings.topic_request,
                    value=json.dumps(value).encode(),
                    key=booking.encode(),
                    headers=_headers("req-5-again", parent),
                )
        invalid = {"booking_id": f"bk-{prefix}-bad", "amount": 5, "currency": "XXX",
                   "payment_method": "pm_card_visa"}  # fmt: skip
        await producer.send(
            settings.topic_request,
            value=json.dumps(invalid).encode(),
            key=b"bad",
            headers=_headers("req-bad", None),
        )
        await producer.send(
            settings.topic_request, value=b"{not json", key=b"x", headers=_headers("p", None)
        )
        await producer.flush()
    finally:
        await producer.stop()

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    container = make_container(settings)
    container.tracer_provider.override(providers.Object(provider))
    fake = FakeProcessor()
    container.processor.override(providers.Object(fake))
    listener = AIOKafkaConsumer(
        *topics[1:],
        bootstrap_servers=kafka_bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=client_fetch_max_wait_ms(),
    )
    await listener.start()
    received: list[ConsumerRecord[bytes, bytes]] = []
    service = Service(settings, container)
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(120):
            while True:
                for batch in (await listener.getmany(timeout_ms=100)).values():
                    received.extend(batch)
                terminal = {
                    _data(r)["booking_id"]
                    for r in received
                    if r.topic in (settings.topic_completed, settings.topic_failed)
                }
                dead = [r for r in received if r.topic == settings.topic_dead_letter]
                if len(terminal) == BOOKINGS + 1 and dead:
                    break
        await asyncio.sleep(1.0)  # anything extra (a duplicate not ignored) shows up now
        for batch in (await listener.getmany(timeout_ms=500)).values():
            received.extend(batch)
    finally:
        service.stop()
        await asyncio.wait_for(task, 60)
        await listener.stop()

    by_topic = Counter(r.topic for r in received)
    assert by_topic[settings.topic_initiated] == BOOKINGS
    assert by_topic[settings.topic_completed] == BOOKINGS
    assert by_topic[settings.topic_failed] == 1  # the invalid request
    assert by_topic[settings.topic_dead_letter] == 1  # the poison message
    assert len(fake.charges) == BOOKINGS
    for record in received:
        if record.topic in (settings.topic_initiated, settings.topic_completed):
            booking = _data(record)["booking_id"]
            traceparent = _header(record, "traceparent")
            assert traceparent is not None and traceparent.split("-")[1] == traces[booking]

    # Batches did happen: the single path opens a "db transaction" span per message.
    spans = exporter.get_finished_spans()
    processed = [s for s in spans if s.name == f"process {settings.topic_request}"]
    transactions = [s for s in spans if s.name == "db transaction"]
    assert len(processed) >= BOOKINGS + 3
    assert len(transactions) < BOOKINGS
