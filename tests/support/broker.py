"""Kafka bootstrap servers for tests: configured, a Docker container, or an embedded broker."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

from payment.adapters.embedded import EmbeddedBroker

KAFKA_ENV_VAR = "PAYMENT_TEST_KAFKA_BOOTSTRAP_SERVERS"
# Set to 0 to skip containers even where Docker runs (the embedded broker starts in
# ~0.1 s, a Kafka container in tens of seconds).
USE_DOCKER_ENV_VAR = "PAYMENT_TEST_USE_DOCKER"


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
    """Yield `host:port[,host:port]` of a Kafka-compatible broker for the tests.

    In order: `$PAYMENT_TEST_KAFKA_BOOTSTRAP_SERVERS`; a testcontainers Kafka when a
    Docker engine answers and testcontainers is installed; else an `EmbeddedBroker`
    (Tansu, no idempotent producer) started here and stopped on exit.
    """
    configured = os.environ.get(KAFKA_ENV_VAR, "").strip()
    if configured:
        yield configured
        return
    if _testcontainers_installed() and docker_engine_available():
        with _kafka_container() as servers:
            yield servers
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap_servers
