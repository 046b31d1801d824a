"""A consumer that lost its group membership does not commit offsets.

The broker here is a private Tansu whose storage is memory: stopped and started again on
the same port it is a new, empty cluster, and its logs start again at offset 0. The
service's consumer meanwhile held offsets it had handled but not yet committed (the
periodic commit is turned off here so that this is certain). Its session expires while
the broker is away; before it joins the group again it is told its partitions are
revoked, and a commit at that point would carry no generation, which a broker accepts
into an empty group. Those offsets belong to the old log: committed on the new one they
would make the group skip the records written there since (Tansu, unlike Kafka, does not
answer a fetch past the end of a log with OFFSET_OUT_OF_RANGE; it waits for the log to
grow). Every request sent after the restart must get its payment.

It stays on a private Tansu whatever broker the suites use: a broker that forgets its
logs is the case at hand. On Apache Kafka the logs survive a restart; its analog, a
committed offset past the end of a recreated topic, is answered OFFSET_OUT_OF_RANGE and
handled as `tests/integration/test_kafka_broker_behaviour.py` shows.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime

import psycopg
import pytest
from dependency_injector import providers

from payment.adapters.kafka.producer import create_producer
from payment.adapters.kafka.topics import ensure_topics
from payment.adapters.postgres.migrations import migrate
from payment.adapters.processors.fake import FakeProcessor
from payment.bootstrap import make_container
from payment.devtools.embedded import EmbeddedBroker
from payment.service import Service
from support.net import free_port
from support.service_settings import isolated_settings, topics_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SESSION_TIMEOUT_MS = 3_000


async def _request(bootstrap: str, topic: str, bookings: list[str]) -> None:
    producer = create_producer(bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for booking in bookings:
            value = {"booking_id": booking, "amount": 1500, "currency": "EUR",
                     "payment_method": "pm_card_visa"}  # fmt: skip
            headers = [
                ("ce_specversion", b"1.0"),
                ("ce_id", uuid.uuid4().hex.encode()),
                ("ce_source", b"saga-orchestrator-test"),
                ("ce_type", b"saga.request_payment"),
                ("ce_time", datetime.now(UTC).isoformat().encode()),
                ("content-type", b"application/json"),
            ]
            await producer.send_and_wait(
                topic, json.dumps(value).encode(), key=booking.encode(), headers=headers
            )
    finally:
        await producer.stop()


async def _completed(database_url: str, bookings: list[str]) -> set[str]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        rows = await (
            await conn.execute(
                "SELECT booking_id FROM payment_payments WHERE booking_id = ANY(%s)"
                " AND status = 'COMPLETED'",
                (bookings,),
            )
        ).fetchall()
    return {booking for (booking,) in rows}


async def _wait_completed(database_url: str, bookings: list[str], timeout_s: float) -> set[str]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        done = await _completed(database_url, bookings)
        if len(done) == len(bookings) or asyncio.get_running_loop().time() > deadline:
            return done
        await asyncio.sleep(0.1)


async def test_offsets_of_a_lost_membership_are_not_committed_to_a_restarted_broker(
    database_url: str,
) -> None:
    broker = EmbeddedBroker(port=free_port())  # a fixed port: the restart must reuse it
    broker.start()
    try:
        bootstrap = broker.bootstrap_servers
        prefix = f"member{uuid.uuid4().hex[:8]}"
        settings = isolated_settings(
            prefix,
            database_url=database_url,
            bootstrap=bootstrap,
            kafka_enable_idempotence=False,
            kafka_fetch_max_wait_ms=10,  # Tansu answers a fetch only when this expires
            kafka_topic_partitions=1,  # one partition: the old offsets all lie ahead
            kafka_session_timeout_ms=SESSION_TIMEOUT_MS,
            kafka_heartbeat_interval_ms=300,
            kafka_commit_interval_ms=3_600_000,  # only the commit on revocation
            reconcile_after_s=600.0,  # the reconciler must not hide a skipped record
        )
        topics = topics_of(settings)
        await ensure_topics(bootstrap, topics, partitions=1)
        # The test reads payment_payments from the start: it must not race the service's
        # own migration.
        await migrate(database_url)
        container = make_container(settings)
        container.processor.override(providers.Object(FakeProcessor()))
        service = Service(settings, container)
        task = asyncio.create_task(service.run())
        try:
            before = [f"{prefix}-before-{n}" for n in range(12)]
            await _request(bootstrap, settings.topic_request, before)
            assert len(await _wait_completed(database_url, before, 60)) == len(before)

            await asyncio.to_thread(broker.stop)
            # Long enough for the session to expire and the member to give up its partitions.
            await asyncio.sleep(SESSION_TIMEOUT_MS / 1000 * 2)
            await asyncio.to_thread(broker.start)
            await ensure_topics(bootstrap, topics, partitions=1)

            after = [f"{prefix}-after-{n}" for n in range(4)]  # offsets 0-3 of the new log
            await _request(bootstrap, settings.topic_request, after)
            done = await _wait_completed(database_url, after, 60)
            assert done == set(after), f"never handled: {sorted(set(after) - done)}"
            assert not task.done()
        finally:
            service.stop()
            await asyncio.wait_for(task, 60)
    finally:
        broker.stop()
