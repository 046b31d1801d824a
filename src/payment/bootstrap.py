"""The composition root: a dependency-injector container that picks the adapters and
wires every runtime component (relay, consumer, reconciler, refund worker, retention,
HTTP, metrics collectors) as a provider. `payment.service.Service` starts the container's
resources in order, supervises them and stops them in reverse; tests override providers
(processor, tracer provider, clock) instead of patching."""

from __future__ import annotations

import asyncio
import functools
import inspect
from typing import Any

import msgspec
from dependency_injector import containers, providers

from payment.adapters.kafka.consumer import KafkaInboxConsumer
from payment.adapters.kafka.consumer.intake_gate import OutboxBacklogGate
from payment.adapters.kafka.dead_letters import KafkaDeadLetterPublisher
from payment.adapters.kafka.producer import producer_resource
from payment.adapters.kafka.relay import KafkaOutboxRelay
from payment.adapters.memory import SystemClock
from payment.adapters.observability.instrumented import (
    InstrumentedProcessor,
    InstrumentedUnitOfWorkFactory,
)
from payment.adapters.observability.log_budget import LogBudget
from payment.adapters.observability.metrics import Metrics
from payment.adapters.observability.telemetry import tracer_of, tracer_provider_resource
from payment.adapters.postgres.monitoring import unpublished_outbox_rows
from payment.adapters.postgres.relay_lock import RelayLeadership
from payment.adapters.postgres.retention import RetentionJob
from payment.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from payment.adapters.processors.fake import FakeProcessor
from payment.adapters.processors.limits import LimitedProcessor, limits_for
from payment.adapters.processors.stripe import (
    IDEMPOTENCY_KEY_LIFETIME_S,
    SEARCH_LAG_S,
    StripeProcessor,
)
from payment.application.handlers import ExecutionPolicy, RequestPolicy
from payment.application.reconciler import Reconciler
from payment.application.refund_worker import RefundWorker
from payment.application.refunds import Refunds
from payment.runtime import lifecycle
from payment.runtime.collectors import Collectors, registered_collectors
from payment.runtime.components import (
    database_pool,
    days,
    kafka_consumer_factory,
    kafka_security_of,
    seconds,
    topics_of,
    traced_scope,
)
from payment.runtime.readiness import Readiness, RunningChecks
from payment.runtime.transient import is_transient
from payment.settings import DRAIN_TIMEOUT_S, REVOKE_COMMIT_TIMEOUT_S, Settings


def execution_policy(
    timeout_ms: float, attempts: int, review_s: float, kind: str | None
) -> ExecutionPolicy:
    """How the handlers call the configured gateway."""
    return ExecutionPolicy(
        # The LimitedProcessor bounds each call (not the wait for a slot) with it.
        call_timeout_s=None,
        max_attempts=attempts,
        review_after_s=review_s,
        # The in-process fake keeps its keys for good; Stripe forgets them.
        key_lifetime_s=None if kind == "fake" else IDEMPOTENCY_KEY_LIFETIME_S,
        # One execution's calls (attempts and a lookup, each up to the timeout) and
        # backoffs, with a margin: a live charger is not overtaken.
        charge_lease_s=timeout_ms / 1000.0 * (attempts + 1) + 5.0 * attempts + 10.0,
        lookup_settle_s=0.0 if kind == "fake" else SEARCH_LAG_S,
    )


def _stripe_processor(
    name: str, config: providers.Configuration, limits: providers.Provider[Any]
) -> providers.Singleton[Any]:
    """Stripe, live (`stripe`) or in test mode (`sandbox`): one client per instance."""
    return providers.Singleton(
        StripeProcessor,
        api_key=config.stripe_api_key,
        api_base=config.stripe_api_base,
        name=name,
        max_connections=limits.provided.max_concurrency,
    )


class Container(containers.DeclarativeContainer):
    """Everything `run` needs, from the adapters up to the running components."""

    settings = providers.Dependency(instance_of=Settings)
    config = providers.Configuration(strict=True)

    # -- adapters ----------------------------------------------------------------------

    clock = providers.Singleton(SystemClock)
    metrics = providers.Singleton(Metrics)
    # The SDK configured from OTEL_*; tests override it with a provider of their own.
    tracer_provider = providers.Resource(tracer_provider_resource)
    tracer = providers.Callable(tracer_of, tracer_provider)
    # One budget for every per-message INFO line (adapters/observability/log_budget.py).
    log_budget = providers.Singleton(LogBudget, config.lifecycle_log_per_s)

    pool = providers.Resource(
        database_pool,
        url=config.database_url,
        min_size=config.db_pool_min,
        max_size=config.db_pool_max,
    )
    uow_factory = providers.Singleton(PostgresUnitOfWorkFactory, pool)
    # The relay, health checks, metrics collectors and retention get connections of
    # their own: behind a backlog of handlers queueing for `pool` they would stall
    # publication and report a busy instance as not ready.
    control_pool = providers.Resource(
        database_pool, url=config.database_url, min_size=1, max_size=5
    )
    control_uow_factory = providers.Singleton(PostgresUnitOfWorkFactory, control_pool)
    # Handlers see instrumented adapters: spans, trace stamping on outbox rows, metrics
    # and lifecycle log lines (adapters/observability/instrumented.py).
    instrumented_uow_factory = providers.Singleton(
        InstrumentedUnitOfWorkFactory, uow_factory, tracer, metrics, log_budget=log_budget
    )

    # The gateway's limits (contract 4.9), shared by every caller of the processor.
    limits = providers.Singleton(
        limits_for,
        config.processor,
        config.processor_max_concurrency,
        config.processor_max_rate,
    )

    processor = providers.Selector(
        config.processor,
        fake=providers.Singleton(
            FakeProcessor,
            mode=config.fake_mode,
            success_rate=config.fake_success_rate,
            seed=config.fake_seed,
            latency_ms=config.fake_latency_ms,
            ledger_path=config.fake_ledger_path,
        ),
        sandbox=_stripe_processor("sandbox", config, limits),
        stripe=_stripe_processor("stripe", config, limits),
    )
    # The configured processor, closed at shutdown.
    gateway = providers.Resource(lifecycle.open_gateway, processor)
    # Limits outside, instruments inside: call durations and timeouts are the gateway's
    # own, without the wait for a slot. Charges and refunds both go through it.
    limited_processor = providers.Singleton(
        LimitedProcessor,
        providers.Singleton(InstrumentedProcessor, gateway, tracer, metrics, log_budget=log_budget),
        limits,
        call_timeout_s=providers.Callable(seconds, config.processor_timeout_ms),
    )

    # How every Kafka client connects (TLS, SASL): the producer, consumers, admin, tools.
    kafka_security = providers.Singleton(kafka_security_of, settings)

    producer = providers.Resource(
        producer_resource,
        config.kafka_bootstrap_servers,
        enable_idempotence=config.kafka_enable_idempotence,
        security=kafka_security,
    )

    topics = providers.Singleton(topics_of, settings)

    # -- application -------------------------------------------------------------------

    policy = providers.Singleton(
        execution_policy,
        config.processor_timeout_ms,
        config.processor_max_attempts,
        config.review_after_s,
        config.processor,
    )
    request_policy = providers.Singleton(RequestPolicy, max_amount=config.max_amount)
    refunds = providers.Singleton(
        Refunds, instrumented_uow_factory, limited_processor, clock, policy, request_policy
    )

    # -- runtime components ------------------------------------------------------------

    # What /health/ready answers; set once the consumer first joined its group.
    readiness = providers.Singleton(Readiness)
    joined = providers.Singleton(asyncio.Event)
    http = providers.Resource(
        lifecycle.http_server, config.http_host, config.http_port, readiness, metrics
    )

    outbox_waiter = providers.Resource(lifecycle.outbox_waiter, config.database_url)
    relay = providers.Singleton(
        KafkaOutboxRelay,
        producer,
        # The relay only reads and marks rows: no payment events to observe.
        control_uow_factory,
        topics,
        clock,
        source=config.event_source,
        batch_size=config.relay_batch_size,
        wait_for_work=outbox_waiter,
        # One relay publishes at a time across instances (an advisory lock).
        leadership=providers.Singleton(RelayLeadership, config.database_url),
        tracer=tracer,
        log_budget=log_budget,
    )
    # Backpressure: the consumer admits no new request while the outbox backlog is high
    # (marks from the relay's pass size), read by every instance from the database every
    # 200 ms on the control pool, where handlers queueing for `pool` do not delay it.
    intake_gate = providers.Singleton(
        OutboxBacklogGate.for_relay,
        providers.Callable(functools.partial, unpublished_outbox_rows, control_pool),
        config.relay_batch_size,
        metrics=metrics,
    )
    consumer = providers.Singleton(
        KafkaInboxConsumer,
        consumer_factory=providers.Callable(
            kafka_consumer_factory, settings, topics, kafka_security
        ),
        request_topic=topics.provided.request,
        initiated_topic=topics.provided.initiated,
        uow_factory=instrumented_uow_factory,
        processor=limited_processor,
        clock=clock,
        dead_letters=providers.Singleton(
            KafkaDeadLetterPublisher, producer, topics.provided.dead_letter, config.consumer_group
        ),
        metrics=metrics,
        request_policy=request_policy,
        policy=policy,
        is_transient=providers.Object(is_transient),
        max_in_flight=config.max_in_flight,
        commit_interval_s=providers.Callable(seconds, config.kafka_commit_interval_ms),
        commit_timeout_s=REVOKE_COMMIT_TIMEOUT_S,
        drain_timeout_s=DRAIN_TIMEOUT_S,
        tracer=tracer,
        consumer_group=config.consumer_group,
        log_budget=log_budget,
        joined=joined,
        refund_topic=topics.provided.refund,
        refunds=refunds,
        intake=intake_gate,
    )
    reconciler = providers.Singleton(
        Reconciler,
        instrumented_uow_factory,
        limited_processor,
        clock,
        policy,
        threshold_s=config.reconcile_after_s,
        interval_s=config.reconcile_interval_s,
        # The bulkhead's worth: a backlog drains at the gateway's rate. New payments
        # still get slots (one FIFO queue for executor and reconciler).
        parallelism=limits.provided.max_concurrency,
        scope=providers.Callable(traced_scope, tracer, control_pool),
    )
    refund_worker = providers.Singleton(
        RefundWorker,
        refunds,
        threshold_s=config.refund_retry_after_s,
        interval_s=config.refund_interval_s,
        scope=providers.Callable(traced_scope, tracer, control_pool, name="settle refunds"),
    )
    retention = providers.Singleton(
        RetentionJob,
        control_pool,
        clock.provided.now,
        outbox_age=providers.Callable(days, config.retention_outbox_days),
        inbox_age=providers.Callable(days, config.retention_inbox_days),
        interval_s=config.retention_interval_s,
        batch=config.retention_batch_size,
    )
    collectors = providers.Resource(
        registered_collectors,
        metrics,
        # What each scrape reads (Collectors' fields, in order): the pools, the
        # gateway's limits and every running component.
        providers.Singleton(
            Collectors,
            metrics,
            providers.Dict(main=pool, control=control_pool),
            limited_processor,
            relay,
            consumer,
            reconciler,
            refund_worker,
            retention,
        ),
    )
    running_checks = providers.Singleton(RunningChecks, settings, control_pool, producer, consumer)

    # Started in this order (the relay first, the consumer last), stopped in reverse
    # within one bound: the consumer's drain, then what it leaves for the relay's flush.
    stop_deadline = providers.Singleton(lifecycle.StopDeadline, DRAIN_TIMEOUT_S)
    running_relay = providers.Resource(
        lifecycle.running, relay, "outbox-relay", lifecycle.flush, stop_deadline
    )
    running_workers = providers.Resource(
        lifecycle.running_in_background,
        reconciler=reconciler,
        retention=retention,
        # The lifecycle summary is written each second even when no line follows.
        log_budget=log_budget,
        refund_worker=refund_worker,
        intake_gate=intake_gate,
    )
    running_consumer = providers.Resource(
        lifecycle.running, consumer, "consumer", lifecycle.drain, stop_deadline
    )


def make_container(settings: Settings) -> Container:
    """A container configured from validated settings."""
    container = Container(settings=settings)
    container.config.from_dict(msgspec.structs.asdict(settings))
    return container


async def resolved(value: Any) -> Any:
    """A provider's value: awaited when it depends on an async resource."""
    return await value if inspect.isawaitable(value) else value


async def shutdown_resources(container: Container) -> None:
    """Close what the container still holds open (pools, producer, tracer provider)."""
    pending = container.shutdown_resources()
    if pending is not None:
        await pending
