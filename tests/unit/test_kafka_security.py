"""The one place every Kafka client gets its TLS and SASL arguments from."""

from __future__ import annotations

import ssl

import pytest

from payment.adapters.kafka.security import KafkaSecurity, client_security
from payment.bootstrap import make_container
from payment.settings import load_settings


def test_plaintext_passes_nothing_but_the_protocol() -> None:
    assert client_security(None) == {"security_protocol": "PLAINTEXT"}


def test_sasl_ssl_gives_a_verifying_context_and_the_credentials() -> None:
    kwargs = client_security(
        KafkaSecurity(
            protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="payments",
            sasl_password="pw",
        )
    )
    context = kwargs.pop("ssl_context")
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert kwargs == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "payments",
        "sasl_plain_password": "pw",
    }


def test_hostname_check_off_still_verifies_the_chain() -> None:
    context = client_security(KafkaSecurity(protocol="SSL", ssl_check_hostname=False))[
        "ssl_context"
    ]
    assert not context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_sasl_plaintext_has_no_tls_context() -> None:
    kwargs = client_security(
        KafkaSecurity(
            protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u", sasl_password="p"
        )
    )
    assert "ssl_context" not in kwargs
    assert kwargs["security_protocol"] == "SASL_PLAINTEXT"


@pytest.mark.parametrize("show", [repr, str])
def test_the_password_is_never_shown(show: object) -> None:
    security = KafkaSecurity(
        protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u", sasl_password="hunter2"
    )
    assert callable(show)
    assert "hunter2" not in show(security)


def test_the_container_builds_the_security_from_settings() -> None:
    settings = load_settings(
        {
            "PAYMENT_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "PAYMENT_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
            "PAYMENT_KAFKA_SASL_USERNAME": "svc",
            "PAYMENT_KAFKA_SASL_PASSWORD": "pw",
            "PAYMENT_KAFKA_SSL_CHECK_HOSTNAME": "false",
        }
    )
    assert make_container(settings).kafka_security() == KafkaSecurity(
        protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="svc",
        sasl_password="pw",
        ssl_check_hostname=False,
    )
