"""The Kafka producer the relay and the dead-letter publisher share (what they need of it:
`RecordSender`, `RecordQueue` in application/ports.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaProducer

from payment.adapters.kafka.partitioner import key_partitioner
from payment.adapters.kafka.security import KafkaSecurity, client_security

log = logging.getLogger(__name__)

# How long closing the producer waits for the acknowledgements of what it still holds.
CLOSE_TIMEOUT_S = 5.0


def create_producer(
    bootstrap_servers: str | list[str],
    *,
    enable_idempotence: bool = True,
    client_id: str = "payment-service",
    linger_ms: int = 0,
    request_timeout_ms: int = 30_000,
    max_batch_size: int = 256 * 1024,
    security: KafkaSecurity | None = None,
) -> AIOKafkaProducer:
    """An unstarted producer configured for the outbox: every acknowledgement is durable.

    `enable_idempotence` must be off for brokers without InitProducerId (Tansu).
    """
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        client_id=client_id,
        # A published outbox row is marked and never sent again: its ack must mean that
        # every in-sync replica has it, not just the leader.
        acks="all",
        enable_idempotence=enable_idempotence,
        # No linger: the relay queues a whole round before it awaits anything, so the
        # round shares requests anyway; a linger only delayed every ack (issue 15).
        linger_ms=linger_ms,
        request_timeout_ms=request_timeout_ms,
        # A relay pass sends up to hundreds of rows at once; aiokafka's default of 16 KiB
        # per partition batch split them into many more requests (2x fewer rows/s).
        max_batch_size=max_batch_size,
        # Kafka's default partitioner, cheaper than aiokafka's (partitioner.py).
        partitioner=key_partitioner,
        **client_security(security),
    )


async def producer_resource(
    bootstrap_servers: str | list[str],
    *,
    enable_idempotence: bool = True,
    security: KafkaSecurity | None = None,
    close_timeout_s: float = CLOSE_TIMEOUT_S,
) -> AsyncIterator[AIOKafkaProducer]:
    """A started producer, stopped (after flushing) when the generator closes.

    The flush gives up after `close_timeout_s`: with the broker down it would wait for it
    to come back (the idempotent producer retries without end). What is dropped then was
    never acknowledged: the outbox rows stay pending and are sent after the restart.
    Shaped for a dependency-injector `Resource`.
    """
    producer = create_producer(
        bootstrap_servers, enable_idempotence=enable_idempotence, security=security
    )
    try:
        await producer.start()
    except BaseException:
        # A failed start leaves connections and tasks behind unless stopped.
        await producer.stop()
        raise
    try:
        yield producer
    finally:
        try:
            async with asyncio.timeout(close_timeout_s):
                await producer.stop()
        except TimeoutError:
            log.warning(
                "producer: records unacknowledged %.0fs after closing were dropped", close_timeout_s
            )
