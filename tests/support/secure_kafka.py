"""An Apache Kafka with a SASL_SSL (SCRAM-SHA-512) listener, certificates from support.certificates.

The broker keeps its PLAINTEXT listener on loopback for its own readiness probe; the
service under test is pointed at the SASL_SSL one only, which advertises `localhost`:
the broker certificate names `localhost` (DNS) and nothing else, so connecting by
`127.0.0.1` is the wrong-hostname case.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from payment.devtools.apache_kafka import ApacheKafkaBroker

from .certificates import Certificates, make_certificates
from .net import free_port

SCRAM = "SCRAM-SHA-512"
LISTENER = "SECURE"


@dataclass(frozen=True)
class SecureKafka:
    """Where the SASL_SSL listener is and who may use it."""

    broker: ApacheKafkaBroker
    certificates: Certificates
    port: int
    username: str
    password: str

    @property
    def bootstrap(self) -> str:
        """The listener by the name its certificate holds."""
        return f"localhost:{self.port}"

    @property
    def bootstrap_by_ip(self) -> str:
        """The same listener by an address the certificate does not hold."""
        return f"127.0.0.1:{self.port}"

    def service_env(self, **overrides: str) -> dict[str, str]:
        """The PAYMENT_* variables a client needs to reach this listener."""
        return {
            "PAYMENT_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "PAYMENT_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "PAYMENT_KAFKA_SASL_MECHANISM": SCRAM,
            "PAYMENT_KAFKA_SASL_USERNAME": self.username,
            "PAYMENT_KAFKA_SASL_PASSWORD": self.password,
            "PAYMENT_KAFKA_SSL_CAFILE": str(self.certificates.ca),
            **overrides,
        }


@contextlib.contextmanager
def secure_kafka(directory: Path) -> Iterator[SecureKafka]:
    """An Apache Kafka with a SASL_SSL listener (SCRAM-SHA-512), started; closed on exit."""
    certificates = make_certificates(directory / "certs")
    username, password = "payment-service", "scram-" + secrets.token_urlsafe(18)
    port = free_port()
    prefix = f"listener.name.{LISTENER.lower()}"
    broker = ApacheKafkaBroker(
        extra_listeners={LISTENER: f"SASL_SSL://localhost:{port}"},
        properties={
            f"{prefix}.sasl.enabled.mechanisms": SCRAM,
            f"{prefix}.{SCRAM.lower()}.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            f"{prefix}.ssl.keystore.type": "PEM",
            f"{prefix}.ssl.keystore.location": str(certificates.server_keystore),
            f"{prefix}.ssl.client.auth": "none",
        },
        # The credential exists from the first start (KRaft keeps it in the metadata log).
        format_options=("--add-scram", f"{SCRAM}=[name={username},password={password}]"),
    )
    with broker:
        yield SecureKafka(broker, certificates, port, username, password)
