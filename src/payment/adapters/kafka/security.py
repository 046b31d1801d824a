"""How every Kafka client connects (TLS, SASL), and a check that says what is wrong."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import msgspec
from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    IllegalSaslStateError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context

from payment.domain.redaction import REDACTED

# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH = (62, 64)


class KafkaSecurity(msgspec.Struct, frozen=True, kw_only=True):
    """A connection's security, as the PAYMENT_KAFKA_SECURITY_PROTOCOL, _SASL_*, _SSL_* give it."""

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True

    def __repr__(self) -> str:
        # The password never reaches a log line, an error or a span.
        password = REDACTED if self.sasl_password else None
        return (
            f"KafkaSecurity(protocol={self.protocol!r}, sasl_mechanism={self.sasl_mechanism!r},"
            f" sasl_username={self.sasl_username!r}, sasl_password={password!r},"
            f" ssl_cafile={self.ssl_cafile!r}, ssl_certfile={self.ssl_certfile!r},"
            f" ssl_check_hostname={self.ssl_check_hostname!r})"
        )

    __str__ = __repr__

    @property
    def uses_tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")


PLAINTEXT = KafkaSecurity()


def ssl_context(security: KafkaSecurity) -> ssl.SSLContext:
    """A client TLS context: the broker's certificate verified against the CA file (or the
    system's CAs), its name checked unless turned off, and an optional client certificate."""
    context: ssl.SSLContext = create_ssl_context(
        cafile=security.ssl_cafile,
        certfile=security.ssl_certfile,
        keyfile=security.ssl_keyfile,
    )
    # Turning the name check off keeps the chain check: the certificate must still be
    # signed by a trusted CA.
    context.check_hostname = security.ssl_check_hostname
    return context


def client_security(security: KafkaSecurity | None) -> dict[str, Any]:
    """The keyword arguments every aiokafka client (producer, consumer, admin) takes for it."""
    security = security or PLAINTEXT
    kwargs: dict[str, Any] = {"security_protocol": security.protocol}
    if security.uses_tls:
        kwargs["ssl_context"] = ssl_context(security)
    if security.uses_sasl:
        kwargs["sasl_mechanism"] = security.sasl_mechanism
        kwargs["sasl_plain_username"] = security.sasl_username
        kwargs["sasl_plain_password"] = security.sasl_password
    return kwargs


class KafkaSecurityRejected(Exception):
    """The broker answered, but refused the connection's TLS or SASL settings.

    `setting` names the variable to look at; the message never holds a secret.
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


class KafkaUnreachable(Exception):
    """No bootstrap server answered within the time allowed."""


async def check_connection(
    bootstrap_servers: str, security: KafkaSecurity | None, *, timeout_s: float = 10.0
) -> None:
    """Connect to one bootstrap server and authenticate as the clients will.

    aiokafka's own start-up reports any failure as "unable to bootstrap"; this says which
    setting is wrong (`KafkaSecurityRejected`), or that no broker answered
    (`KafkaUnreachable`), within `timeout_s` per server.
    """
    security = security or PLAINTEXT
    kwargs = client_security(security)
    unreachable: list[str] = []
    for server in (part.strip() for part in bootstrap_servers.split(",")):
        host, _, port = server.rpartition(":")
        host = host.strip("[]")
        try:
            async with asyncio.timeout(timeout_s):
                conn = await create_conn(
                    host,
                    int(port),
                    client_id="payment-service-check",
                    request_timeout_ms=int(timeout_s * 1000),
                    **kwargs,
                )
        except ssl.SSLCertVerificationError as exc:
            raise _untrusted(server, exc) from None
        except ssl.SSLError as exc:
            raise KafkaSecurityRejected(
                "PAYMENT_KAFKA_SECURITY_PROTOCOL",
                f"the TLS handshake with {server} failed ({exc.reason or type(exc).__name__});"
                f" is {security.protocol} what this listener speaks?",
            ) from None
        except (SaslAuthenticationFailed, AuthenticationFailedError, IllegalSaslStateError):
            raise KafkaSecurityRejected(
                "PAYMENT_KAFKA_SASL_PASSWORD",
                f"{server} refused the credentials of user {security.sasl_username!r}"
                f" ({security.sasl_mechanism}); check it and PAYMENT_KAFKA_SASL_USERNAME",
            ) from None
        except UnsupportedSaslMechanismError:
            raise KafkaSecurityRejected(
                "PAYMENT_KAFKA_SASL_MECHANISM",
                f"{server} does not offer {security.sasl_mechanism}",
            ) from None
        except (OSError, KafkaError, TimeoutError) as exc:
            unreachable.append(f"{server} ({type(exc).__name__})")
            continue
        conn.close()
        return
    raise KafkaUnreachable(f"no Kafka bootstrap server answered: {', '.join(unreachable)}")


def _untrusted(server: str, exc: ssl.SSLCertVerificationError) -> KafkaSecurityRejected:
    if exc.verify_code in _NAME_MISMATCH:
        return KafkaSecurityRejected(
            "PAYMENT_KAFKA_BOOTSTRAP_SERVERS",
            f"the certificate of {server} is not issued to that name; connect by a name the"
            " certificate holds (or, on a private network, PAYMENT_KAFKA_SSL_CHECK_HOSTNAME=false)",
        )
    return KafkaSecurityRejected(
        "PAYMENT_KAFKA_SSL_CAFILE",
        f"the certificate of {server} is not trusted ({exc.verify_message})",
    )
