"""How the running components are built from the settings and the adapters (the
container's factories for what needs more than passing values through)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from opentelemetry.trace import Tracer

from payment.adapters.kafka.security import KafkaSecurity, client_security
from payment.adapters.observability.instrumented import reconcile_scope
from payment.adapters.postgres.monitoring import stored_trace
from payment.adapters.postgres.pool import open_pool

ConsumerFactory = Callable[[ConsumerRebalanceListener], Awaitable[AIOKafkaConsumer]]


async def database_pool(url: str, min_size: int, max_size: int) -> AsyncIterator[Any]:
    """A resource: a connection pool, closed at shutdown."""
    async with open_pool(url, min_size=min_size, max_size=max_size) as pool:
        yield pool


def kafka_consumer_factory(
    *,
    bootstrap_servers: str,
    group_id: str,
    fetch_max_wait_ms: int,
    session_timeout_ms: int,
    rebalance_timeout_ms: int,
    heartbeat_interval_ms: int,
    topics: list[str],
    security: KafkaSecurity,
) -> ConsumerFactory:
    """How the inbox consumer makes (and remakes) its Kafka client."""

    async def make_consumer(listener: ConsumerRebalanceListener) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            group_id=group_id,
            enable_auto_commit=False,
            # Neither a missing nor a vanished offset is reset silently:
            # adapters/kafka/offset_reset.py decides, and says so.
            auto_offset_reset="none",
            fetch_max_wait_ms=fetch_max_wait_ms,
            session_timeout_ms=session_timeout_ms,
            rebalance_timeout_ms=rebalance_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
            max_poll_records=500,
            **client_security(security),
        )
        consumer.subscribe(topics, listener=listener)
        await consumer.start()
        return consumer

    return make_consumer


def traced_scope(
    tracer: Tracer, control_pool: Any, name: str = "reconcile payment"
) -> Callable[[uuid.UUID], AbstractAsyncContextManager[None]]:
    """A background worker's per-payment span, in the trace stored with the payment."""
    return reconcile_scope(
        tracer, lambda payment_id: stored_trace(control_pool, payment_id), name=name
    )


def days(days: float) -> timedelta | None:
    """A retention window; 0 days means "keep forever" (no window)."""
    return timedelta(days=days) if days > 0 else None


def seconds(milliseconds: float) -> float:
    return milliseconds / 1000.0
