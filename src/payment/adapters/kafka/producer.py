"""The Kafka producer the relay and the dead-letter publisher share (what they need of it:
`RecordSender`, `RecordQueue` in application/ports.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiokafka import AIOKafkaProducer

from payment.adapters.kafka.security import KafkaSecurity, client_security


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
        **client_security(security),
    )


async def producer_resource(
    bootstrap_servers: str | list[str],
    *,
    enable_idempotence: bool = True,
    security: KafkaSecurity | None = None,
) -> AsyncIterator[AIOKafkaProducer]:
    """A started producer, stopped (after flushing) when the generator closes.

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
        await producer.stop()
