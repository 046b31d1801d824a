"""The composition root: dependency-injector containers that pick and wire the adapters."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from datetime import timedelta
from typing import Any

import msgspec
import psycopg
import psycopg_pool
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from dependency_injector import containers, providers

from payment.adapters.kafka.consumer import KafkaInboxConsumer
from payment.adapters.kafka.dead_letters import KafkaDeadLetterPublisher
from payment.adapters.kafka.producer import producer_resource
from payment.adapters.kafka.relay import KafkaOutboxRelay
from payment.adapters.kafka.security import (
    KafkaSecurity,
    KafkaSecurityRejected,
    KafkaUnreachable,
    check_connection,
    client_security,
)
from payment.adapters.kafka.topics import (
    TopicCreationFailed,
    Topics,
    check_topics,
    ensure_topics,
)
from payment.adapters.memory import SystemClock
from payment.adapters.observability.http import HealthServer
from payment.adapters.observability.instrumented import (
    InstrumentedProcessor,
    InstrumentedUnitOfWorkFactory,
    reconcile_scope,
)
from payment.adapters.observability.log_budget import LogBudget
from payment.adapters.observability.logs import configure_logging as configure_log_output
from payment.adapters.observability.metrics import Metrics, observe_pools
from payment.adapters.observability.process_stats import process_stats
from payment.adapters.observability.telemetry import tracer_of, tracer_provider_resource
from payment.adapters.postgres.connection_check import (
    DatabaseRejected,
    DatabaseUnreachable,
    check_database,
    unencrypted_remote_hosts,
)
from payment.adapters.postgres.errors import is_transient as is_transient_database_error
from payment.adapters.postgres.migrations import MigrationError, check_schema, migrate
from payment.adapters.postgres.monitoring import DatabaseStats, read_stats, stored_trace
from payment.adapters.postgres.outbox import wait_for_outbox_notification
from payment.adapters.postgres.pool import open_pool
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
from payment.adapters.startup import broker_failure, database_failure
from payment.application.commands import ResolveReview
from payment.application.handlers import ExecutionPolicy
from payment.application.handlers import Settings as HandlerSettings
from payment.application.reconciler import Reconciler
from payment.application.refund_worker import RefundWorker
from payment.application.refunds import Refunds
from payment.application.review import ReviewLookup, resolve_review
from payment.domain.events import PaymentReviewResolved
from payment.settings import (
    DRAIN_TIMEOUT_S,
    REVOKE_COMMIT_TIMEOUT_S,
    ConfigError,
    DependencyUnavailable,
    Settings,
    run_defaults,
)

log = logging.getLogger("payment")

# On SIGTERM, after the consumer's drain: how long the relay may flush the outbox, and then
# finish its pass (README, "Exit codes" and the grace period).
RELAY_FLUSH_S = 10.0
RELAY_STOP_S = 1.0


async def ended_or_logged(task: asyncio.Task[None], what: str) -> None:
    """Wait for a stopping task; log, not raise, how it failed: the stop goes on.

    With the broker gone the Kafka client's own close can fail, even with a
    CancelledError of its own (not this task's); the work it leaves uncommitted is
    handled again after the restart.
    """
    await asyncio.wait({task})
    if task.cancelled():
        log.warning("run: %s did not stop cleanly: its close was cancelled", what)
    elif (error := task.exception()) is not None:
        log.error("run: %s did not stop cleanly", what, exc_info=error)


async def stop_within(task: asyncio.Task[None], seconds: float) -> None:
    """Wait up to `seconds` for a stopping task to end, then cancel it."""
    await asyncio.wait({task}, timeout=seconds)
    if not task.done():
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# Errors that mean "the database or the broker is unreachable right now": the consumer
# retries these for as long as they last and never dead-letters because of them. Database
# errors are judged by SQLSTATE class (adapters/postgres/errors.py), not by Python type.
_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (KafkaError, ConnectionError, TimeoutError)


def is_transient(exc: BaseException) -> bool:
    """True for an outage of the database or the broker: wait and retry, never park."""
    return isinstance(exc, _TRANSIENT_TYPES) or is_transient_database_error(exc)


async def _pool_resource(url: str, min_size: int, max_size: int) -> AsyncIterator[Any]:
    async with open_pool(url, min_size=min_size, max_size=max_size) as pool:
        yield pool


class Container(containers.DeclarativeContainer):
    """Everything `run` needs; tests override providers (processor, clock) instead of patching."""

    config = providers.Configuration(strict=True)

    clock = providers.Singleton(SystemClock)
    metrics = providers.Singleton(Metrics)
    # The SDK configured from OTEL_*; tests override it with a provider of their own.
    tracer_provider = providers.Resource(tracer_provider_resource)
    tracer = providers.Callable(tracer_of, tracer_provider)

    pool = providers.Resource(
        _pool_resource,
        url=config.database_url,
        min_size=config.db_pool_min,
        max_size=config.db_pool_max,
    )
    uow_factory = providers.Singleton(PostgresUnitOfWorkFactory, pool)
    # The relay, health checks, metrics collectors and retention get connections of
    # their own: behind a backlog of handlers queueing for `pool` they would stall
    # publication and report a busy instance as not ready.
    control_pool = providers.Resource(
        _pool_resource, url=config.database_url, min_size=1, max_size=4
    )
    control_uow_factory = providers.Singleton(PostgresUnitOfWorkFactory, control_pool)

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
        sandbox=providers.Singleton(
            StripeProcessor,
            api_key=config.stripe_api_key,
            api_base=config.stripe_api_base,
            name="sandbox",
            max_connections=limits.provided.max_concurrency,
        ),
        stripe=providers.Singleton(
            StripeProcessor,
            api_key=config.stripe_api_key,
            api_base=config.stripe_api_base,
            name="stripe",
            max_connections=limits.provided.max_concurrency,
        ),
    )

    # How every Kafka client connects (TLS, SASL): the producer, consumers, admin, tools.
    kafka_security = providers.Singleton(
        KafkaSecurity,
        protocol=config.kafka_security_protocol,
        sasl_mechanism=config.kafka_sasl_mechanism,
        sasl_username=config.kafka_sasl_username,
        sasl_password=config.kafka_sasl_password,
        ssl_cafile=config.kafka_ssl_cafile,
        ssl_certfile=config.kafka_ssl_certfile,
        ssl_keyfile=config.kafka_ssl_keyfile,
        ssl_check_hostname=config.kafka_ssl_check_hostname,
    )

    producer = providers.Resource(
        producer_resource,
        config.kafka_bootstrap_servers,
        enable_idempotence=config.kafka_enable_idempotence,
        security=kafka_security,
    )

    topics = providers.Singleton(
        Topics,
        request=config.topic_request,
        initiated=config.topic_initiated,
        completed=config.topic_completed,
        failed=config.topic_failed,
        dead_letter=config.topic_dead_letter,
        refund=config.topic_refund,
        refunded=config.topic_refunded,
        refund_failed=config.topic_refund_failed,
    )

    policy = providers.Singleton(
        lambda timeout_ms, attempts, review_s, kind: ExecutionPolicy(
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
        ),
        config.processor_timeout_ms,
        config.processor_max_attempts,
        config.review_after_s,
        config.processor,
    )
    handler_settings = providers.Singleton(HandlerSettings, max_amount=config.max_amount)


async def _resolved(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def _shutdown_resources(container: Container) -> None:
    pending = container.shutdown_resources()
    if pending is not None:
        await pending


def make_container(settings: Settings) -> Container:
    """A container configured from validated settings."""
    container = Container()
    container.config.from_dict(msgspec.structs.asdict(settings))
    return container


async def resolve_review_now(
    settings: Settings, cmd: ResolveReview
) -> tuple[PaymentReviewResolved, ReviewLookup]:
    """`review resolve`: the handler on the configured database and gateway (which must be
    chosen, as for `run`: the gateway is asked before anything is recorded)."""
    container = make_container(run_defaults(settings))
    try:
        try:
            await container.pool()
            uow_factory = await _resolved(container.uow_factory())
        except (OSError, psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise DependencyUnavailable(database_failure(exc, str(settings.database_url))) from exc
        gateway = container.processor()
        try:
            return await resolve_review(cmd, uow_factory, gateway, container.clock())
        finally:
            closer = getattr(gateway, "aclose", None)
            if closer is not None:
                await closer()
    finally:
        await _shutdown_resources(container)


def configure_logging(settings: Settings) -> None:
    """Text or JSON lines on stderr, with trace ids, through the redacting filter."""
    configure_log_output(settings.log_level, settings.log_format)


def readiness_limits(stats: DatabaseStats, settings: Settings) -> dict[str, str]:
    """The age checks of /health/ready: "ok", or why not (a limit of 0 turns one off)."""
    checks: dict[str, str] = {}
    for name, age, limit, what in (
        ("outbox", stats.outbox_oldest_age_s, settings.ready_max_outbox_age_s, "unpublished row"),
        (
            "in_flight",
            stats.in_flight_oldest_age_s,
            settings.ready_max_in_flight_age_s,
            "in-flight payment",
        ),
    ):
        if limit > 0:
            checks[name] = (
                "ok" if age <= limit else f"oldest {what} is {age:.0f}s old (limit {limit:g}s)"
            )
    return checks


def backlog_check(waiting: int, limit: int) -> dict[str, str]:
    """The backlog check of /health/ready: work waiting (consumer lag, requests held at
    the door, payments accepted and not yet charged) against `limit` (0 turns it off)."""
    if limit <= 0:
        return {}
    if waiting <= limit:
        return {"backlog": "ok"}
    return {"backlog": f"{waiting} messages or payments waiting (limit {limit})"}


class Service:
    """The composed `payment-service run`: consumer, executor, relay, reconciler, HTTP."""

    def __init__(self, settings: Settings, container: Container | None = None) -> None:
        if not settings.database_url:
            raise ConfigError("PAYMENT_DATABASE_URL: required by run (dev starts an embedded one)")
        if not settings.kafka_bootstrap_servers:
            raise ConfigError(
                "PAYMENT_KAFKA_BOOTSTRAP_SERVERS: required by run (dev starts an embedded one)"
            )
        # What `run` decides for settings left unset; PAYMENT_PROCESSOR must be chosen.
        settings = run_defaults(settings)
        self.settings = settings
        self.container = container or make_container(settings)
        self._stop = asyncio.Event()
        self.http: HealthServer | None = None
        self.consumer: KafkaInboxConsumer | None = None
        # Set when the consumer first joined its group and got partitions.
        self.joined = asyncio.Event()
        # Set once every component is up (readiness then runs its real checks).
        self.started = asyncio.Event()
        # What /health/ready answers: "starting" until every component is up.
        self._starting = "starting: opening HTTP"
        self._ready_check: Callable[[], Awaitable[dict[str, str]]] | None = None

    async def _readiness(self) -> dict[str, str]:
        if self._ready_check is None:
            return {"startup": self._starting}
        return await self._ready_check()

    async def _prepare_schema(self) -> None:
        """Migrate (PAYMENT_MIGRATE_ON_START) or check that the schema is this code's."""
        s = self.settings
        url = str(s.database_url)
        try:
            async with asyncio.timeout(s.startup_timeout_s):
                if s.migrate_on_start:
                    self._starting = "starting: applying migrations"
                    applied = await migrate(url)
                    log.info(
                        "run: migrations %s",
                        f"applied: {', '.join(f'{v:04d}' for v in applied)}"
                        if applied
                        else "up to date",
                    )
                    return
                self._starting = "starting: checking the schema"
                result = await check_schema(url)
        except MigrationError as exc:
            raise DependencyUnavailable(f"database schema: {exc}") from exc
        except (OSError, TimeoutError, psycopg.Error) as exc:
            raise DependencyUnavailable(database_failure(exc, url)) from exc
        if not result.agrees:
            raise DependencyUnavailable(f"database schema: {result.line}")
        log.info("run: %s", result.line)

    async def _prepare_topics(self, topics: Topics, security: KafkaSecurity) -> None:
        """Create the topics (PAYMENT_KAFKA_CREATE_TOPICS) or check that they are usable."""
        s = self.settings
        servers = str(s.kafka_bootstrap_servers)
        try:
            async with asyncio.timeout(s.startup_timeout_s):
                if s.kafka_create_topics:
                    self._starting = "starting: creating topics"
                    created = await ensure_topics(
                        servers,
                        topics.names,
                        partitions=s.kafka_topic_partitions,
                        replication=int(s.kafka_replication_factor or 1),
                        min_insync_replicas=s.kafka_min_insync_replicas,
                        security=security,
                    )
                    if created:
                        log.info(
                            "run: created topics %s (%d partitions, replication factor %s)",
                            ", ".join(created),
                            s.kafka_topic_partitions,
                            s.kafka_replication_factor,
                        )
                self._starting = "starting: checking topics"
                problem = await check_topics(servers, topics.names, security=security)
        except TopicCreationFailed as exc:
            raise DependencyUnavailable(f"Kafka {servers}: {exc}") from exc
        except (OSError, TimeoutError, KafkaError) as exc:
            raise DependencyUnavailable(broker_failure(exc, servers)) from exc
        if problem is not None:
            raise DependencyUnavailable(f"Kafka {servers}: {problem}")
        log.info("run: topics ready: %s", ", ".join(topics.names))

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        s = self.settings
        c = self.container
        topics: Topics = c.topics()
        metrics: Metrics = c.metrics()
        metrics.set_build_info(processor=str(s.processor))
        if s.processor == "fake":
            log.warning(
                "run: PAYMENT_PROCESSOR=fake: nothing is charged, every payment is simulated"
                " (set PAYMENT_PROCESSOR=stripe in production)"
            )
        security: KafkaSecurity = c.kafka_security()
        async with AsyncExitStack() as stack:
            stack.push_async_callback(_shutdown_resources, c)
            # Liveness answers from the first second; readiness says "starting" until
            # the schema, the topics, the pools and the producer are up.
            self.http = HealthServer(s.http_host, s.http_port, self._readiness, metrics.render)
            try:
                await self.http.start()
            except OSError as exc:
                raise DependencyUnavailable(
                    f"HTTP {s.http_host}:{s.http_port}: cannot listen ({exc.strerror}): check"
                    " PAYMENT_HTTP_HOST and PAYMENT_HTTP_PORT"
                ) from exc
            stack.push_async_callback(self.http.stop)
            # One connection each first, as the clients will make them: a refused TLS or
            # SASL setting, a refused login or no answer is one line naming the setting.
            self._starting = "starting: connecting to the broker and the database"
            await check_kafka(str(s.kafka_bootstrap_servers), security)
            await check_postgres(str(s.database_url))
            await self._prepare_schema()
            # The Kafka client logs each failed connection at ERROR; a failed start-up
            # ends with one line naming the cause, so those stay quiet unless DEBUG.
            with _quiet_kafka_client(s.log_level.upper() != "DEBUG"):
                await self._prepare_topics(topics, security)
            self._starting = "starting: opening the database pools and the producer"
            try:
                async with asyncio.timeout(s.startup_timeout_s):
                    control = await c.control_pool()
                    store_pool = await c.pool()
                    # Its provider depends on the async pool Resource: an awaitable.
                    store_uow_factory = await _resolved(c.uow_factory())
            except (OSError, TimeoutError, psycopg.Error, psycopg_pool.PoolTimeout) as exc:
                raise DependencyUnavailable(database_failure(exc, str(s.database_url))) from exc
            try:
                with _quiet_kafka_client(s.log_level.upper() != "DEBUG"):
                    async with asyncio.timeout(s.startup_timeout_s):
                        producer = await c.producer()
            except (OSError, TimeoutError, KafkaError) as exc:
                raise DependencyUnavailable(
                    broker_failure(exc, str(s.kafka_bootstrap_servers))
                ) from exc
            clock = c.clock()
            tracer = c.tracer()
            # Handlers see instrumented adapters: spans, trace stamping on outbox rows,
            # metrics and lifecycle log lines (adapters/instrumented.py).
            # One budget for every per-message INFO line (adapters/log_budget.py).
            budget = LogBudget(s.lifecycle_log_per_s)
            uow_factory = InstrumentedUnitOfWorkFactory(
                store_uow_factory, tracer, metrics, log_budget=budget
            )
            gateway = c.processor()
            closer = getattr(gateway, "aclose", None)
            if closer is not None:
                # The Stripe adapter's HTTP client; the fake has nothing to close.
                stack.push_async_callback(closer)
            # Limits outside, instruments inside: call durations and timeouts are the
            # gateway's own, without the wait for a slot.
            processor = LimitedProcessor(
                InstrumentedProcessor(gateway, tracer, metrics, log_budget=budget),
                c.limits(),
                call_timeout_s=s.processor_timeout_ms / 1000.0,
            )
            log.info("run: database pool open, producer started, processor %s", processor.name)

            waiter = wait_for_outbox_notification(str(s.database_url))
            stack.push_async_callback(waiter.aclose)
            relay = KafkaOutboxRelay(
                producer,
                # The relay only reads and marks rows: no payment events to observe.
                await _resolved(c.control_uow_factory()),
                topics,
                clock,
                source=s.event_source,
                batch_size=s.relay_batch_size,
                wait_for_work=waiter,
                # One relay publishes at a time across instances (an advisory lock).
                leadership=RelayLeadership(str(s.database_url)),
                tracer=tracer,
                log_budget=budget,
            )

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
                consumer.subscribe(
                    [topics.request, topics.initiated, topics.refund], listener=listener
                )
                await consumer.start()
                return consumer

            # Refund calls go through the same `processor` as charges (one wrapper covers both).
            refunds = Refunds(uow_factory, processor, clock, c.policy(), c.handler_settings())
            refund_worker = RefundWorker(
                refunds,
                threshold_s=s.refund_retry_after_s,
                interval_s=s.refund_interval_s,
                scope=reconcile_scope(
                    tracer,
                    lambda payment_id: stored_trace(control, payment_id),
                    name="settle refunds",
                ),
            )
            consumer = self.consumer = KafkaInboxConsumer(
                consumer_factory=make_consumer,
                request_topic=topics.request,
                initiated_topic=topics.initiated,
                uow_factory=uow_factory,
                processor=processor,
                clock=clock,
                dead_letters=KafkaDeadLetterPublisher(
                    producer, topics.dead_letter, s.consumer_group
                ),
                metrics=metrics,
                settings=c.handler_settings(),
                policy=c.policy(),
                is_transient=is_transient,
                max_in_flight=s.max_in_flight,
                commit_interval_s=s.kafka_commit_interval_ms / 1000,
                commit_timeout_s=REVOKE_COMMIT_TIMEOUT_S,
                drain_timeout_s=DRAIN_TIMEOUT_S,
                tracer=tracer,
                consumer_group=s.consumer_group,
                log_budget=budget,
                joined=self.joined,
                refund_topic=topics.refund,
                refunds=refunds,
            )
            reconciler = Reconciler(
                uow_factory,
                processor,
                clock,
                c.policy(),
                threshold_s=s.reconcile_after_s,
                interval_s=s.reconcile_interval_s,
                # The bulkhead's worth: a backlog drains at the gateway's rate. New
                # payments still get slots (one FIFO queue for executor and reconciler).
                parallelism=processor.limits.max_concurrency,
                scope=reconcile_scope(tracer, lambda payment_id: stored_trace(control, payment_id)),
            )

            retention = RetentionJob(
                control,
                clock.now,
                outbox_age=_days(s.retention_outbox_days),
                inbox_age=_days(s.retention_inbox_days),
                interval_s=s.retention_interval_s,
                batch=s.retention_batch_size,
            )

            async def collect_database() -> None:
                stats = await read_stats(control)
                metrics.observe("payment.outbox.backlog", [(stats.outbox_backlog, {})])
                metrics.observe("payment.outbox.oldest_age", [(stats.outbox_oldest_age_s, {})])
                metrics.observe("payment.payments.in_flight", [(stats.in_flight, {})])
                metrics.observe(
                    "payment.payments.in_flight.oldest_age", [(stats.in_flight_oldest_age_s, {})]
                )
                metrics.observe("payment.payments.review_pending", [(stats.review_pending, {})])

            async def collect_process() -> None:
                # The usual actions read 0 until they happen, so alerts have a series.
                actions = dict.fromkeys(("completed", "failed", "unknown", "flagged", "error"), 0)
                actions.update(reconciler.actions)
                metrics.observe(
                    "payment.reconciler.actions",
                    [(count, {"action": action}) for action, count in actions.items()],
                )
                refund_actions = dict.fromkeys(("refunded", "failed", "unknown", "error"), 0)
                refund_actions.update(refund_worker.actions)
                metrics.observe(
                    "payment.refund_worker.actions",
                    [(count, {"action": action}) for action, count in refund_actions.items()],
                )
                gateway_labels = {"processor": processor.name}
                for name, value in (
                    ("payment.processor.in_flight", processor.in_flight),
                    ("payment.processor.in_flight_max", processor.most_in_flight),
                    ("payment.processor.waiting", processor.waiting),
                    ("payment.processor.rate_limit", processor.rate.rate()),
                    ("payment.processor.throttled", processor.throttles),
                ):
                    metrics.observe(name, [(value, gateway_labels)])
                metrics.observe("payment.outbox.published", [(relay.published, {})])
                metrics.observe("payment.outbox.send_failures", [(relay.send_failures, {})])
                lags = await consumer.lag()
                metrics.observe(
                    "payment.consumer.lag",
                    [
                        (lag, {"topic": tp.topic, "partition": str(tp.partition)})
                        for tp, lag in lags.items()
                    ],
                )

            async def collect_instance() -> None:
                stats = process_stats()
                for name, key in (
                    ("process.cpu", "cpu_s"),
                    ("process.resident_memory", "rss_bytes"),
                    ("process.open_fds", "open_fds"),
                    ("process.max_fds", "max_fds"),
                    ("process.start_time", "start_time_s"),
                ):
                    if key in stats:
                        metrics.observe(name, [(stats[key], {})])
                pools = {"main": store_pool, "control": control}
                observe_pools(metrics, {name: pool.get_stats() for name, pool in pools.items()})
                metrics.observe("payment.outbox.relay_leader", [(int(relay.leading), {})])
                metrics.observe(
                    "payment.retention.purged",
                    [
                        (retention.purged_outbox, {"table": "outbox"}),
                        (retention.purged_inbox, {"table": "inbox"}),
                    ],
                )
                metrics.observe("payment.retention.failed_rounds", [(retention.failed_rounds, {})])

            for collector in (collect_instance, collect_process, collect_database):
                metrics.add_collector(collector)
                stack.callback(metrics.remove_collector, collector)

            # The database and broker checks run side by side, and the backlog query only
            # when the database answered: during an outage the answer (503) comes within
            # one 2 s timeout, not after three of them in a row.
            async def database_checks() -> tuple[dict[str, str], int]:
                """The database's checks, and how many payments are in flight (0 if unread)."""
                checks: dict[str, str] = {}
                try:
                    async with asyncio.timeout(2.0), control.connection() as conn:
                        await conn.execute("SELECT 1")
                    checks["database"] = "ok"
                except Exception as exc:  # any failure means "not ready"
                    checks["database"] = f"unavailable ({type(exc).__name__})"
                    return checks, 0
                if (
                    s.ready_max_outbox_age_s > 0
                    or s.ready_max_in_flight_age_s > 0
                    or s.ready_max_backlog > 0
                ):
                    try:
                        async with asyncio.timeout(2.0):
                            stats = await read_stats(control)
                        checks.update(readiness_limits(stats, s))
                        return checks, stats.in_flight
                    except Exception as exc:  # any failure means "not ready"
                        checks["backlog"] = f"unknown ({type(exc).__name__})"
                return checks, 0

            async def broker_checks() -> dict[str, str]:
                try:
                    async with asyncio.timeout(2.0):
                        await producer.client.fetch_all_metadata()
                    return {"broker": "ok"}
                except Exception as exc:  # any failure means "not ready"
                    return {"broker": f"unavailable ({type(exc).__name__})"}

            async def consumer_backlog() -> int | None:
                """Messages fetched or waiting on the broker, not handled yet (None: unknown)."""
                try:
                    async with asyncio.timeout(2.0):
                        lags = await consumer.lag()
                except Exception:  # any failure means "not ready"
                    return None
                return sum(lags.values()) + consumer.backlog

            async def readiness() -> dict[str, str]:
                (database, in_flight), broker, waiting = await asyncio.gather(
                    database_checks(), broker_checks(), consumer_backlog()
                )
                backlog: dict[str, str] = {}
                if s.ready_max_backlog > 0 and "backlog" not in database:
                    backlog = (
                        {"backlog": "unknown (consumer lag)"}
                        if waiting is None
                        # Accepted and not yet charged counts too: the executor's queue.
                        else backlog_check(waiting + in_flight, s.ready_max_backlog)
                    )
                return {"database": database.pop("database"), **broker, **database, **backlog}

            self._ready_check = readiness
            self.started.set()

            relay_task = asyncio.create_task(relay.run(), name="outbox-relay")
            reconciler_task = asyncio.create_task(reconciler.run(), name="reconciler")
            retention_task = asyncio.create_task(retention.run(), name="retention")
            # The lifecycle summary is written each second even when no line follows.
            summary_task = asyncio.create_task(budget.run(), name="log-budget")
            refund_task = asyncio.create_task(refund_worker.run(), name="refund-worker")
            consumer_task = asyncio.create_task(consumer.run(), name="consumer")
            log.info(
                "run: consuming %s, %s and %s as group %s",
                topics.request,
                topics.initiated,
                topics.refund,
                s.consumer_group,
            )
            stopper = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait(
                {stopper, consumer_task, relay_task}, return_when=asyncio.FIRST_COMPLETED
            )
            background = (reconciler_task, retention_task, summary_task, refund_task)
            if stopper not in done:
                # A component ended on its own: that is a crash. Stop the rest before the
                # pool and producer close under them, then surface it.
                everything: list[asyncio.Task[Any]] = [
                    stopper,
                    consumer_task,
                    relay_task,
                    *background,
                ]
                for running in everything:
                    running.cancel()
                await asyncio.gather(*everything, return_exceptions=True)
                for finished in done:
                    finished.result()
            log.info("run: stopping: draining in-flight messages")
            # The relay's part of the stop fits in what the drain's bound leaves of it.
            stop_by = asyncio.get_running_loop().time() + DRAIN_TIMEOUT_S
            consumer.stop()
            await ended_or_logged(consumer_task, "the consumer")
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            log.info("run: flushing the outbox relay")
            left = stop_by - asyncio.get_running_loop().time()
            await relay.flush(min(RELAY_FLUSH_S, max(0.0, left)))
            relay.stop()
            # A pass still waiting for acknowledgements is cut: its rows stay pending.
            await stop_within(relay_task, RELAY_STOP_S)
            log.info("run: stopped cleanly")


@contextmanager
def _quiet_kafka_client(quiet: bool) -> Iterator[None]:
    """aiokafka's log lines only above ERROR while the block runs (when `quiet`)."""
    client = logging.getLogger("aiokafka")
    previous = client.level
    if quiet:
        client.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        client.setLevel(previous)


async def check_kafka(bootstrap_servers: str, security: KafkaSecurity) -> None:
    """Fail fast, naming the setting, when the broker refuses our TLS or SASL settings;
    aiokafka itself would only say "unable to bootstrap". A broker that does not answer is
    reported by the step that needs it (adapters/startup.py's wording, exit code 3)."""
    try:
        await check_connection(bootstrap_servers, security)
    except KafkaSecurityRejected as exc:
        raise ConfigError(str(exc)) from None
    except KafkaUnreachable:
        pass  # the start-up step that needs the broker says why, in its own words


async def check_postgres(
    url: str, check: Callable[[str], Awaitable[None]] = check_database
) -> None:
    """Warn when a remote database is reached without TLS; fail fast, naming the setting,
    when the server refuses the connection (exit 2). One that does not answer is reported
    by the step that needs it (adapters/startup.py's wording, exit code 3)."""
    hosts, mode = unencrypted_remote_hosts(url)
    if hosts:
        log.warning(
            "PAYMENT_DATABASE_URL: database host %s is reached without TLS (sslmode=%s);"
            ' use sslmode=verify-full with sslrootcert (README, "Secure connections")',
            ", ".join(hosts),
            mode,
        )
    try:
        await check(url)
    except DatabaseRejected as exc:
        raise ConfigError(f"PAYMENT_DATABASE_URL: {exc}") from None
    except DatabaseUnreachable:
        pass  # the step that needs the database says why (adapters/startup.py)


def _days(days: float) -> timedelta | None:
    """A retention window; 0 days means "keep forever" (no window)."""
    return timedelta(days=days) if days > 0 else None


async def run_until_signalled(service: Service) -> None:
    """Run the service; SIGTERM and SIGINT stop it gracefully."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop)
    await service.run()
