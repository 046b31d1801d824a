"""Before `run` starts anything: one connection to each dependency, then the schema and
the topics, each failure one line naming the setting (exit code 2) or the dependency
(exit code 3, in adapters/startup.py's words)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

import psycopg
from aiokafka.errors import KafkaError

from payment.adapters.kafka.security import (
    KafkaSecurity,
    KafkaSecurityRejected,
    KafkaUnreachable,
    check_connection,
)
from payment.adapters.kafka.topics import TopicCreationFailed, Topics, check_topics, ensure_topics
from payment.adapters.postgres.connection_check import (
    DatabaseRejected,
    DatabaseUnreachable,
    check_database,
    unencrypted_remote_hosts,
)
from payment.adapters.postgres.migrations import MigrationError, check_schema, migrate
from payment.adapters.startup import broker_failure, database_failure
from payment.settings import ConfigError, DependencyUnavailable, Settings

log = logging.getLogger("payment")

# Told what start-up is doing: /health/ready answers it until every component is up.
Announce = Callable[[str], None]


@contextmanager
def quiet_kafka_client(quiet: bool) -> Iterator[None]:
    """aiokafka's log lines only above ERROR while the block runs (when `quiet`).

    The Kafka client logs each failed connection at ERROR; a failed start-up ends with
    one line naming the cause, so those stay quiet unless PAYMENT_LOG_LEVEL=DEBUG.
    """
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


async def prepare_schema(s: Settings, announce: Announce) -> None:
    """Migrate (PAYMENT_MIGRATE_ON_START) or check that the schema is this code's."""
    url = str(s.database_url)
    try:
        async with asyncio.timeout(s.startup_timeout_s):
            if s.migrate_on_start:
                announce("starting: applying migrations")
                applied = await migrate(url)
                log.info(
                    "run: migrations %s",
                    f"applied: {', '.join(f'{v:04d}' for v in applied)}"
                    if applied
                    else "up to date",
                )
                return
            announce("starting: checking the schema")
            result = await check_schema(url)
    except MigrationError as exc:
        raise DependencyUnavailable(f"database schema: {exc}") from exc
    except (OSError, TimeoutError, psycopg.Error) as exc:
        raise DependencyUnavailable(database_failure(exc, url)) from exc
    if not result.agrees:
        raise DependencyUnavailable(f"database schema: {result.line}")
    log.info("run: %s", result.line)


async def prepare_topics(
    s: Settings, topics: Topics, security: KafkaSecurity, announce: Announce
) -> None:
    """Create the topics (PAYMENT_KAFKA_CREATE_TOPICS) or check that they are usable."""
    servers = str(s.kafka_bootstrap_servers)
    try:
        async with asyncio.timeout(s.startup_timeout_s):
            if s.kafka_create_topics:
                announce("starting: creating topics")
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
            announce("starting: checking topics")
            problem = await check_topics(servers, topics.names, security=security)
    except TopicCreationFailed as exc:
        raise DependencyUnavailable(f"Kafka {servers}: {exc}") from exc
    except (OSError, TimeoutError, KafkaError) as exc:
        raise DependencyUnavailable(broker_failure(exc, servers)) from exc
    if problem is not None:
        raise DependencyUnavailable(f"Kafka {servers}: {problem}")
    log.info("run: topics ready: %s", ", ".join(topics.names))
