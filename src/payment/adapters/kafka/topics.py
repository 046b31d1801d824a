"""Topic names (contract section 1) and their creation at start-up."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from payment.adapters.kafka.security import KafkaSecurity, client_security
from payment.application.messages import (
    PAYMENT_COMPLETED,
    PAYMENT_FAILED,
    PAYMENT_INITIATED,
    PAYMENT_REFUND_FAILED,
    PAYMENT_REFUNDED,
)

log = logging.getLogger(__name__)

DEFAULT_PARTITIONS = 6
# Kafka error codes in a DescribeTopics answer.
_UNKNOWN_TOPIC = 3
_TOPIC_AUTHORIZATION_FAILED = 29


class Topics(msgspec.Struct, frozen=True, kw_only=True):
    """The service's topic names; defaults are the contract's."""

    request: str = "saga.request_payment"
    initiated: str = "payment.initiated"
    completed: str = "payment.completed"
    failed: str = "payment.failed"
    dead_letter: str = "payment.dead_letter"
    refund: str = "saga.refund_payment"
    refunded: str = "payment.refunded"
    refund_failed: str = "payment.refund_failed"

    @property
    def outbound(self) -> Mapping[str, str]:
        """Topic of each outbound CloudEvents type (what `encode_outbound` needs)."""
        return {
            PAYMENT_INITIATED: self.initiated,
            PAYMENT_COMPLETED: self.completed,
            PAYMENT_FAILED: self.failed,
            PAYMENT_REFUNDED: self.refunded,
            PAYMENT_REFUND_FAILED: self.refund_failed,
        }

    @property
    def names(self) -> tuple[str, ...]:
        """Every topic the service reads or writes."""
        return (
            self.request,
            self.initiated,
            self.completed,
            self.failed,
            self.dead_letter,
            self.refund,
            self.refunded,
            self.refund_failed,
        )


class TopicCreationFailed(Exception):
    """The broker refused to create a topic for a reason other than it existing already."""


async def partitions_of(
    bootstrap_servers: str | list[str], topic: str, security: KafkaSecurity | None = None
) -> list[int]:
    """The partition numbers of `topic`, sorted; empty when it does not exist.

    Asked of the cluster, not of a consumer: aiokafka's consumer knows the partitions of
    the topics it is subscribed to or assigned, and `topics()` does not change that.
    """
    async with _admin(bootstrap_servers, security) as admin:
        (described,) = await admin.describe_topics([topic])
    if described["error_code"] != 0:
        return []
    return sorted(int(p["partition"]) for p in described["partitions"])


@asynccontextmanager
async def _admin(
    bootstrap_servers: str | list[str], security: KafkaSecurity | None, **options: Any
) -> AsyncIterator[AIOKafkaAdminClient]:
    """A started admin client, closed on the way out."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers,
        client_id="payment-service-admin",
        **options,
        **client_security(security),
    )
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def _wait_for_leaders(admin: AIOKafkaAdminClient, names: list[str], timeout_s: float) -> None:
    """Return once every partition of `names` has a leader; raise after `timeout_s`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        described = await admin.describe_topics(names)
        leaderless = [
            str(topic["topic"])
            for topic in described
            if topic["error_code"] != 0
            or not topic["partitions"]
            or any(p["error_code"] != 0 or p["leader"] < 0 for p in topic["partitions"])
        ]
        if not leaderless:
            return
        if asyncio.get_running_loop().time() >= deadline:
            raise TopicCreationFailed(
                f"topics without a partition leader after {timeout_s:g} s: {', '.join(leaderless)}"
            )
        await asyncio.sleep(0.05)


async def ensure_topics(
    bootstrap_servers: str | list[str],
    names: Iterable[str],
    partitions: int = DEFAULT_PARTITIONS,
    replication: int = 1,
    *,
    timeout_ms: int = 30_000,
    min_insync_replicas: int | None = None,
    security: KafkaSecurity | None = None,
) -> list[str]:
    """Create whichever of `names` do not exist; returns the ones this call created.

    `min_insync_replicas` sets the new topics' `min.insync.replicas` (unset: the broker's
    default). Existing topics are left as they are (partition count included). Safe to run from
    several instances at once: losing the race to create a topic is not an error.
    Raises `TopicCreationFailed` for any other refusal, or aiokafka's `KafkaError` if the
    broker cannot be reached.
    """
    wanted = list(dict.fromkeys(names))
    async with _admin(bootstrap_servers, security, request_timeout_ms=timeout_ms) as admin:
        existing = set(await admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if not missing:
            return []
        configs = (
            {} if min_insync_replicas is None else {"min.insync.replicas": str(min_insync_replicas)}
        )
        response = await admin.create_topics(
            [
                NewTopic(name, partitions, replication, topic_configs=dict(configs))
                for name in missing
            ],
            timeout_ms=timeout_ms,
        )
        # Apache Kafka answers CreateTopics once the controller has recorded them; their
        # partitions get leaders a moment later, and until then clients are refused.
        await _wait_for_leaders(admin, missing, timeout_ms / 1000)
    created: list[str] = []
    # create_topics reports per-topic errors in the response instead of raising.
    for topic, code, *_ in response.topic_errors:
        if code == 0:
            created.append(topic)
            continue
        error = for_code(code)
        if error is TopicAlreadyExistsError:
            continue  # another instance created it between our listing and our request
        raise TopicCreationFailed(
            f"cannot create topic {topic}: {error.__name__}"
            + (
                " (the principal needs CREATE on the topic or the cluster)"
                if "Authorization" in error.__name__
                else ""
            )
            + (
                f" (the cluster has fewer brokers than replication factor {replication})"
                if error.__name__ == "InvalidReplicationFactorError"
                else ""
            )
        )
    if created:
        log.info("created topics %s (%d partitions)", ", ".join(created), partitions)
    return created


async def check_topics(
    bootstrap_servers: str | list[str],
    names: Iterable[str],
    *,
    timeout_ms: int = 30_000,
    security: KafkaSecurity | None = None,
) -> str | None:
    """Why the existing topics cannot serve the service, in one line; None when they can.

    Every topic of `names` must exist with a leader for each partition, and all must have
    the same partition count: outbound events of a payment and the `payment.initiated` it
    consumes are keyed by payment id, and the executor relies on one partitioning.
    Raises aiokafka's `KafkaError` if the broker cannot be reached.
    """
    wanted = list(dict.fromkeys(names))
    async with _admin(bootstrap_servers, security, request_timeout_ms=timeout_ms) as admin:
        # Listing first: a metadata request naming a missing topic would let a broker
        # with auto.create.topics.enable create it, with the broker's defaults.
        existing = set(await admin.list_topics())
        present = [name for name in wanted if name in existing]
        described = await admin.describe_topics(present) if present else []
    return topic_problem(wanted, described)


def topic_problem(wanted: list[str], described: Iterable[Mapping[str, Any]]) -> str | None:
    """`check_topics`'s judgement of a DescribeTopics answer (pure, for the unit tests)."""
    by_name = {str(t["topic"]): t for t in described}
    missing: list[str] = []
    denied: list[str] = []
    counts: dict[str, int] = {}
    for name in wanted:
        topic = by_name.get(name)
        code = int(topic["error_code"]) if topic is not None else _UNKNOWN_TOPIC
        if code == _TOPIC_AUTHORIZATION_FAILED:
            denied.append(name)
        elif code != 0 or topic is None:
            missing.append(name)
        else:
            counts[name] = len(topic["partitions"])
    if denied:
        return (
            f"not allowed to describe topics {', '.join(denied)}: grant the service's principal"
            " DESCRIBE, READ and WRITE on them (docs/operations.md, Kafka ACLs)"
        )
    if missing:
        return (
            f"topics missing: {', '.join(missing)}: create them (docs/operations.md, Kafka"
            " topics and ACLs) or set PAYMENT_KAFKA_CREATE_TOPICS=true; if they exist, the"
            " service's principal lacks DESCRIBE on them"
        )
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{name} {count}" for name, count in counts.items())
        return (
            f"topics have different partition counts ({shown}): give them all the same"
            " number of partitions"
        )
    return None
