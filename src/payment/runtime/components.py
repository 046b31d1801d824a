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
from payment.adapters.kafka.topics import Topics
from payment.adapters.observability.instrumented import reconcile_scope
from payment.adapters.postgres.monitoring import stored_trace
from payment.adapters.postgres.pool import open_pool
from payment.settings import Settings

ConsumerFactory = Callable[[ConsumerRebalanceListener], Awaitable[AIOKafkaConsumer]]


async def database_pool(url: str, min_size: int, max_size: int) -> AsyncIterator[Any]:
    """A resource: a connection pool, closed at shutdown."""
    async with open_pool(url, min_size=min_size, max_size=max_size) as pool:
        yield pool


def kafka_consumer_factory(
    settings: Settings, topics: Topics, security: KafkaSecurity
) -> ConsumerFactory:
    """How the inbox consumer makes (and remakes) its Kafka client."""
    s = settings

    async def make_consumer(listener: ConsumerRebalanceListener) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            group_id=s.consumer_group,
            enable_auto_commit=False,
            # Neither a missing nor a vanished offset is reset silently:
            # adapters/kafka/offset_reset.py decides, and says so.
            auto_offset_reset="none",
            fetch_max_wait_ms=s.kafka_fetch_max_wait_ms,
            session_timeout_ms=s.kafka_session_timeout_ms,
            rebalance_timeout_ms=s.kafka_rebalance_timeout_ms,
            heartbeat_interval_ms=s.kafka_heartbeat_interval_ms,
            max_poll_records=500,
            **client_security(security),
        )
        consumer.subscribe([topics.request, topics.initiated, topics.refund], listener=listener)
        await consumer.start()
        return consumer

    return make_consumer


def kafka_security_of(settings: Settings) -> KafkaSecurity:
    """How every Kafka client connects (TLS, SASL), from the PAYMENT_KAFKA_* settings."""
    return KafkaSecurity(
        protocol=settings.kafka_security_protocol,
        **{part: getattr(settings, f"kafka_{part}") for part in _KAFKA_SECURITY_PARTS},
    )


_KAFKA_SECURITY_PARTS = (
    "sasl_mechanism",
    "sasl_username",
    "sasl_password",
    "ssl_cafile",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_check_hostname",
)


def topics_of(settings: Settings) -> Topics:
    """The topic names, from the PAYMENT_TOPIC_* settings."""
    return Topics(**{name: getattr(settings, f"topic_{name}") for name in Topics.__struct_fields__})


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
