"""The checks a loaded `Settings` must pass: each failure is one line naming the variable."""

from __future__ import annotations

import os
import re

from payment.settings.model import (
    DRAIN_TIMEOUT_S,
    MIN_REBALANCE_TIMEOUT_MS,
    PREFIX,
    REVOKE_COMMIT_TIMEOUT_S,
    ConfigError,
    Settings,
)


def env_name(field: str) -> str:
    """The PAYMENT_* variable of a setting."""
    return PREFIX + field.upper()


def validate_replication(s: Settings) -> None:
    rf, isr = s.kafka_replication_factor, s.kafka_min_insync_replicas
    if rf is not None and rf < 1:
        raise ConfigError("PAYMENT_KAFKA_REPLICATION_FACTOR: must be at least 1")
    if isr is not None and isr < 1:
        raise ConfigError("PAYMENT_KAFKA_MIN_INSYNC_REPLICAS: must be at least 1")
    if rf is not None and isr is not None and isr > rf:
        raise ConfigError(
            f"PAYMENT_KAFKA_MIN_INSYNC_REPLICAS: {isr} exceeds"
            f" PAYMENT_KAFKA_REPLICATION_FACTOR ({rf}); no write could ever succeed"
        )


_URL = re.compile(r"postgres(ql)?://[^\s]+")
_HOST_PORT = re.compile(r"[A-Za-z0-9._\[\]:-]+:\d{1,5}")


def validate(s: Settings) -> None:
    if s.database_url is not None and not _URL.fullmatch(s.database_url):
        raise ConfigError(
            "PAYMENT_DATABASE_URL: malformed URL (expected postgresql://user@host:port/dbname)"
        )
    if s.kafka_bootstrap_servers is not None:
        for part in s.kafka_bootstrap_servers.split(","):
            if not _HOST_PORT.fullmatch(part.strip()):
                raise ConfigError(
                    "PAYMENT_KAFKA_BOOTSTRAP_SERVERS: expected comma-separated host:port"
                )
    if s.processor in ("stripe", "sandbox"):
        if not s.stripe_api_key:
            raise ConfigError(
                f"PAYMENT_STRIPE_API_KEY: required when PAYMENT_PROCESSOR={s.processor}"
            )
        is_test = s.stripe_api_key.startswith(("sk_test_", "rk_test_"))
        if s.processor == "sandbox" and not is_test:
            raise ConfigError(
                "PAYMENT_STRIPE_API_KEY: the sandbox processor needs a test key (sk_test_...)"
            )
        if s.processor == "stripe" and is_test:
            raise ConfigError(
                "PAYMENT_STRIPE_API_KEY: a test key cannot be used with PAYMENT_PROCESSOR=stripe"
                " (use sandbox)"
            )
    if s.stripe_api_base is not None and not re.fullmatch(r"https?://[^\s]+", s.stripe_api_base):
        raise ConfigError("PAYMENT_STRIPE_API_BASE: malformed URL (expected http(s)://host[:port])")
    if not 0.0 <= s.fake_success_rate <= 1.0:
        raise ConfigError("PAYMENT_FAKE_SUCCESS_RATE: must be between 0 and 1")
    if s.fake_latency_ms < 0:
        raise ConfigError("PAYMENT_FAKE_LATENCY_MS: must not be negative")
    if not 0 <= s.http_port <= 65535:
        raise ConfigError("PAYMENT_HTTP_PORT: must be a TCP port (0-65535)")
    for field in (
        "max_amount",
        "db_pool_min",
        "db_pool_max",
        "max_in_flight",
        "processor_max_attempts",
        "relay_batch_size",
        "kafka_topic_partitions",
        "kafka_commit_interval_ms",
        "retention_batch_size",
        "processor_max_concurrency",
    ):
        if (value := getattr(s, field)) is not None and value < 1:
            raise ConfigError(f"{env_name(field)}: must be at least 1")
    for field in (
        "processor_max_rate",
        "startup_timeout_s",
        "retention_interval_s",
        "refund_interval_s",
    ):
        if (value := getattr(s, field)) is not None and value <= 0:
            raise ConfigError(f"{env_name(field)}: must be positive")
    for field in (
        "lifecycle_log_per_s",
        "ready_max_outbox_age_s",
        "ready_max_in_flight_age_s",
        "ready_max_backlog",
        "retention_outbox_days",
        "retention_inbox_days",
    ):
        if getattr(s, field) < 0:
            raise ConfigError(f"{env_name(field)}: must not be negative (0 turns it off)")
    if s.kafka_rebalance_timeout_ms < MIN_REBALANCE_TIMEOUT_MS:
        raise ConfigError(
            f"PAYMENT_KAFKA_REBALANCE_TIMEOUT_MS: must be at least {MIN_REBALANCE_TIMEOUT_MS}"
            f" (a revoked partition's drain, {DRAIN_TIMEOUT_S:g} s, plus its commit,"
            f" {REVOKE_COMMIT_TIMEOUT_S:g} s)"
        )
    if s.refund_retry_after_s < 0:
        raise ConfigError("PAYMENT_REFUND_RETRY_AFTER_S: must not be negative")
    if s.db_pool_min > s.db_pool_max:
        raise ConfigError("PAYMENT_DB_POOL_MIN: must not exceed PAYMENT_DB_POOL_MAX")
    validate_replication(s)
    _validate_kafka_security(s)
    if s.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError("PAYMENT_LOG_LEVEL: expected DEBUG, INFO, WARNING, ERROR or CRITICAL")


def _validate_kafka_security(s: Settings) -> None:
    protocol = s.kafka_security_protocol
    uses_sasl = protocol.startswith("SASL_")
    uses_tls = protocol.endswith("SSL")
    sasl = ("kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password")
    tls = ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
    # A credential or certificate the protocol would ignore is a mistake, not a default:
    # an operator who set a password believes the connection is authenticated.
    for field in (*sasl, *tls):
        used = uses_sasl if field in sasl else uses_tls
        if getattr(s, field) is not None and not used:
            raise ConfigError(
                f"{env_name(field)}: set, but PAYMENT_KAFKA_SECURITY_PROTOCOL={protocol}"
                f" does not use {'SASL' if field in sasl else 'TLS'}"
            )
    if not s.kafka_ssl_check_hostname and not uses_tls:
        raise ConfigError(
            f"PAYMENT_KAFKA_SSL_CHECK_HOSTNAME: set, but PAYMENT_KAFKA_SECURITY_PROTOCOL={protocol}"
            " does not use TLS"
        )
    if uses_sasl:
        for field in sasl:
            if not getattr(s, field):
                raise ConfigError(
                    f"{env_name(field)}: required when PAYMENT_KAFKA_SECURITY_PROTOCOL={protocol}"
                )
    if s.kafka_ssl_keyfile is not None and s.kafka_ssl_certfile is None:
        raise ConfigError(
            "PAYMENT_KAFKA_SSL_KEYFILE: set without PAYMENT_KAFKA_SSL_CERTFILE (the client"
            " certificate it belongs to)"
        )
    for field in tls:
        path = getattr(s, field)
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"{env_name(field)}: cannot read {path}")
