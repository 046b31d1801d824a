"""Certificates made with `openssl`, and an Apache Kafka with a SASL_SSL (SCRAM-SHA-512) listener.

The broker keeps its PLAINTEXT listener on loopback for its own readiness probe; the
service under test is pointed at the SASL_SSL one only, which advertises `localhost`:
the broker certificate names `localhost` (DNS) and nothing else, so connecting by
`127.0.0.1` is the wrong-hostname case.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from payment.adapters.apache_kafka import ApacheKafkaBroker

from .net import free_port

SCRAM = "SCRAM-SHA-512"
LISTENER = "SECURE"


@dataclass(frozen=True)
class Certificates:
    """A CA, a server certificate and key signed by it, and a second CA nobody trusts."""

    ca: Path
    server_cert: Path
    server_key: Path
    # key + certificate chain in one PEM file: Kafka's `ssl.keystore.type=PEM`.
    server_keystore: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
        *("-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        cwd=directory,
    )
    return key, cert


def make_certificates(directory: Path, dns_names: tuple[str, ...] = ("localhost",)) -> Certificates:
    """A test CA and a server certificate for `dns_names` (subjectAltName), valid two days."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = _make_ca(directory, "test-ca")
    _, other_ca = _make_ca(directory, "untrusted-ca")
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    _openssl(
        *("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr)),
        *("-subj", f"/CN={dns_names[0]}"),
        cwd=directory,
    )
    extensions = directory / "server.ext"
    extensions.write_text(
        "subjectAltName=" + ",".join(f"DNS:{name}" for name in dns_names) + "\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl(
        *("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key)),
        *("-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(extensions)),
        cwd=directory,
    )
    # PKCS#8, unencrypted: what Kafka's PEM keystore reads without a key password.
    pkcs8 = directory / "server.pkcs8.key"
    _openssl("pkcs8", "-topk8", "-nocrypt", "-in", str(key), "-out", str(pkcs8), cwd=directory)
    keystore = directory / "server.keystore.pem"
    keystore.write_text(pkcs8.read_text() + cert.read_text() + ca.read_text())
    for private in (key, pkcs8, keystore, ca_key):
        private.chmod(0o600)
    return Certificates(
        ca=ca, server_cert=cert, server_key=pkcs8, server_keystore=keystore, other_ca=other_ca
    )


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
