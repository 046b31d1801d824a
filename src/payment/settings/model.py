"""The service's one `Settings` (contract section 5), its exit codes and errors."""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from payment.adapters.processors import ProcessorKind
from payment.domain.redaction import REDACTED

PREFIX = "PAYMENT_"
# How long in-flight messages are waited for on shutdown and when partitions are revoked,
# and how long the commit that follows may take.
DRAIN_TIMEOUT_S = 30.0
REVOKE_COMMIT_TIMEOUT_S = 5.0
MIN_REBALANCE_TIMEOUT_MS = int((DRAIN_TIMEOUT_S + REVOKE_COMMIT_TIMEOUT_S) * 1000)

KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
KafkaSaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

# Settings that may hold a secret: each also reads from a file named by `PAYMENT_<NAME>_FILE`
# (the container orchestrators' convention), and none is ever echoed in a message.
SECRET_FIELDS: tuple[str, ...] = ("database_url", "stripe_api_key", "kafka_sasl_password")
FILE_SUFFIX = "_FILE"


# Exit codes of every command (README, "Exit codes"): what an operator or a supervisor
# tells apart without reading the line.
EXIT_CONFIGURATION = 2
EXIT_UNAVAILABLE = 3

# PAYMENT_* variables that are not settings: read by tools, tests and benchmarks, never by
# the service's configuration. Any other unknown PAYMENT_* variable is a configuration error.
NON_SETTING_VARIABLES = frozenset({"PAYMENT_FAILPOINTS", "PAYMENT_KAFKA_CACHE_DIR"})
NON_SETTING_PREFIXES = ("PAYMENT_TEST_", "PAYMENT_BENCH_")


class ConfigError(Exception):
    """A bad setting; the message is one line naming the variable, never echoing a secret."""


class DependencyUnavailable(Exception):
    """A dependency (database, broker, topics, schema) is missing or refuses us at start-up.

    The message is one line naming what failed and what to check, never a secret.
    """


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Every setting of the service, validated; defaults are the contract's."""

    database_url: str | None = None
    kafka_bootstrap_servers: str | None = None
    # No default for `run`: charging with the fake by accident must be impossible
    # (`dev` and the tests choose `fake`; see `run_defaults` and `dev_defaults`).
    processor: ProcessorKind | None = None
    fake_mode: Literal["success", "fail", "random"] = "success"
    fake_success_rate: float = 0.8
    fake_seed: int | None = None
    fake_latency_ms: float = 0.0
    fake_ledger_path: str | None = None
    stripe_api_key: str | None = None
    stripe_api_base: str | None = None
    consumer_group: str = "payment-service"
    kafka_enable_idempotence: bool = True
    # Apache Kafka answers a fetch as soon as data arrives; this only bounds an idle poll.
    # (`dev` sets 10 ms for its embedded Tansu, which answers only when the wait expires.)
    kafka_fetch_max_wait_ms: int = 500
    kafka_topic_partitions: int = 6
    # Unset (None) means "as the command decides": `run` migrates and creates topics only
    # when told to; `dev` does both on a single-node broker (run_defaults, dev_defaults).
    migrate_on_start: bool | None = None
    kafka_create_topics: bool | None = None
    kafka_replication_factor: int | None = None
    kafka_min_insync_replicas: int | None = None
    # How long each start-up step (schema, topics, database pool, producer) may take
    # before `run` gives up with one line and exit code 3, instead of hanging.
    startup_timeout_s: float = 30.0
    # Group membership: how fast a dead instance's partitions move to the others.
    kafka_session_timeout_ms: int = 10_000
    kafka_heartbeat_interval_ms: int = 1_000
    # How long the group waits for a member to rejoin a rebalance: it must outlast the
    # member's drain of revoked partitions (DRAIN_TIMEOUT_S plus the revocation commit),
    # or the member is dropped and its in-flight messages are handled again elsewhere.
    kafka_rebalance_timeout_ms: int = 60_000
    # How often handled offsets are committed (and once more when partitions are revoked).
    kafka_commit_interval_ms: int = 200
    event_source: str = "payment-service"
    topic_request: str = "saga.request_payment"
    topic_initiated: str = "payment.initiated"
    topic_completed: str = "payment.completed"
    topic_failed: str = "payment.failed"
    topic_dead_letter: str = "payment.dead_letter"
    topic_refund: str = "saga.refund_payment"
    topic_refunded: str = "payment.refunded"
    topic_refund_failed: str = "payment.refund_failed"
    # Refunds left pending (a charge settled after them, or no answer from the gateway):
    # how often the refund worker looks, and how long an unanswered refund waits.
    refund_interval_s: float = 1.0
    refund_retry_after_s: float = 30.0
    http_port: int = 8080
    http_host: str = "0.0.0.0"
    max_amount: int = 100_000_000
    db_pool_min: int = 2
    db_pool_max: int = 16
    # Messages being handled at once. A gateway answering in 300 ms needs 300 in flight
    # for 1,000 payments/s; each costs a few kilobytes while it waits.
    max_in_flight: int = 1024
    processor_timeout_ms: int = 10_000
    processor_max_attempts: int = 4
    # Calls in flight to the gateway and calls per second, per instance; unset: the
    # processor kind's defaults (adapters/processors/limits.py, README).
    processor_max_concurrency: int | None = None
    processor_max_rate: float | None = None
    reconcile_after_s: float = 60.0
    reconcile_interval_s: float = 10.0
    review_after_s: float = 3600.0
    relay_batch_size: int = 500
    # /health/ready turns 503 past these ages (seconds; 0 turns the check off).
    ready_max_outbox_age_s: float = 60.0
    ready_max_in_flight_age_s: float = 900.0
    # /health/ready turns 503 while more messages than this wait to be handled (consumer
    # lag plus requests held back at the door); 0 turns the check off.
    ready_max_backlog: int = 10_000
    # Retention (adapters/postgres/retention.py): published outbox rows and inbox marks
    # older than this many days are purged; 0 keeps them forever. The inbox window must
    # outlast every redelivery (README, "Retention").
    retention_outbox_days: float = 7.0
    retention_inbox_days: float = 14.0
    retention_interval_s: float = 300.0
    retention_batch_size: int = 1000
    log_level: str = "INFO"
    # Per-message INFO lines (payment initiated, processor charge, published …) written per
    # second before the rest are only counted, in one summary line a second (0: no limit).
    lifecycle_log_per_s: float = 50.0
    log_format: Literal["text", "json"] = "text"
    # Kafka connection security (README, "Secure connections"), applied to every client.
    kafka_security_protocol: KafkaSecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: KafkaSaslMechanism | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = None
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    kafka_ssl_check_hostname: bool = True

    def __repr__(self) -> str:
        # The Stripe key, the SASL password and the database password never reach a log line.
        shown = {f: getattr(self, f) for f in self.__struct_fields__ if f not in SECRET_FIELDS}
        shown["database_url"] = redact_url(self.database_url)
        shown["stripe_api_key"] = REDACTED if self.stripe_api_key else None
        shown["kafka_sasl_password"] = REDACTED if self.kafka_sasl_password else None
        return f"Settings({shown})"


_SECRET_IN_URL = re.compile(r"(://[^:/@]*:)[^@]*@")


def redact_url(url: str | None) -> str | None:
    """A URL with its password replaced, fit for a log line."""
    return None if url is None else _SECRET_IN_URL.sub(rf"\1{REDACTED}@", url)
