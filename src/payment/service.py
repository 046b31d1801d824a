"""`payment-service run`: the container's components started in order, supervised, and
stopped in reverse (the consumer drains, the workers stop, the relay flushes)."""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import AsyncExitStack
from typing import Any

import psycopg
import psycopg_pool
from aiokafka.errors import KafkaError
from dependency_injector import providers

from payment.adapters.kafka.consumer import KafkaInboxConsumer
from payment.adapters.observability.http import HealthServer
from payment.adapters.observability.logs import configure_logging as configure_log_output
from payment.adapters.startup import broker_failure, database_failure
from payment.bootstrap import Container, make_container, resolved, shutdown_resources
from payment.runtime.lifecycle import supervise
from payment.runtime.preflight import (
    check_kafka,
    check_postgres,
    prepare_schema,
    prepare_topics,
    quiet_kafka_client,
)
from payment.settings import ConfigError, DependencyUnavailable, Settings, run_defaults

log = logging.getLogger("payment")


def configure_logging(settings: Settings) -> None:
    """Text or JSON lines on stderr, with trace ids, through the redacting filter."""
    configure_log_output(settings.log_level, settings.log_format)


async def started(stack: AsyncExitStack, resource: providers.Resource[Any]) -> Any:
    """Initialise `resource` and have `stack` shut it down (in reverse order of start)."""
    value = await resolved(resource())

    async def shutdown() -> None:
        await resolved(resource.shutdown())

    stack.push_async_callback(shutdown)
    return value


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
        self.joined: asyncio.Event = self.container.joined()
        # Set once every component is up (readiness then runs its real checks).
        self.started = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        s = self.settings
        c = self.container
        c.metrics().set_build_info(processor=str(s.processor))
        if s.processor == "fake":
            log.warning(
                "run: PAYMENT_PROCESSOR=fake: nothing is charged, every payment is simulated"
                " (set PAYMENT_PROCESSOR=stripe in production)"
            )
        readiness = c.readiness()
        async with AsyncExitStack() as stack:
            stack.push_async_callback(shutdown_resources, c)
            # Liveness answers from the first second; readiness says "starting" until
            # the schema, the topics, the pools and the producer are up.
            self.http = await started(stack, c.http)
            await self._prepare(readiness.announce)
            readiness.announce("starting: opening the database pools and the producer")
            await self._connect()
            await started(stack, c.gateway)
            processor = await resolved(c.limited_processor())
            log.info("run: database pool open, producer started, processor %s", processor.name)
            await started(stack, c.outbox_waiter)
            await started(stack, c.collectors)
            self.consumer = await resolved(c.consumer())
            readiness.running(await resolved(c.running_checks()))
            self.started.set()
            async with AsyncExitStack() as running:
                relay = await started(running, c.running_relay)
                workers = await started(running, c.running_workers)
                consumer = await started(running, c.running_consumer)
                topics = c.topics()
                log.info(
                    "run: consuming %s, %s and %s as group %s",
                    topics.request,
                    topics.initiated,
                    topics.refund,
                    s.consumer_group,
                )
                # Returns once stopped; a component that ends on its own is a crash.
                await supervise(self._stop, (consumer, relay), workers)
            log.info("run: stopped cleanly")

    async def _prepare(self, announce: Any) -> None:
        """One connection to each dependency, then the schema and the topics."""
        s, c = self.settings, self.container
        security = c.kafka_security()
        # One connection each first, as the clients will make them: a refused TLS or
        # SASL setting, a refused login or no answer is one line naming the setting.
        announce("starting: connecting to the broker and the database")
        await check_kafka(str(s.kafka_bootstrap_servers), security)
        await check_postgres(str(s.database_url))
        await prepare_schema(s, announce)
        with quiet_kafka_client(s.log_level.upper() != "DEBUG"):
            await prepare_topics(s, c.topics(), security, announce)

    async def _connect(self) -> None:
        """The database pools and the producer, each within the start-up timeout."""
        s, c = self.settings, self.container
        try:
            async with asyncio.timeout(s.startup_timeout_s):
                await c.control_pool()
                await c.pool()
                await resolved(c.uow_factory())
        except (OSError, TimeoutError, psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise DependencyUnavailable(database_failure(exc, str(s.database_url))) from exc
        try:
            with quiet_kafka_client(s.log_level.upper() != "DEBUG"):
                async with asyncio.timeout(s.startup_timeout_s):
                    await c.producer()
        except (OSError, TimeoutError, KafkaError) as exc:
            raise DependencyUnavailable(
                broker_failure(exc, str(s.kafka_bootstrap_servers))
            ) from exc


async def run_until_signalled(service: Service) -> None:
    """Run the service; SIGTERM and SIGINT stop it gracefully."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop)
    await service.run()
