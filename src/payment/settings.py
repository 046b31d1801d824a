"""Configuration (contract section 5): PAYMENT_* environment variables over a TOML file."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import msgspec

PREFIX = "PAYMENT_"
# How long in-flight messages are waited for on shutdown and when partitions are revoked,
# and how long the commit that follows may take.
DRAIN_TIMEOUT_S = 30.0
REVOKE_COMMIT_TIMEOUT_S = 5.0
MIN_REBALANCE_TIMEOUT_MS = int((DRAIN_TIMEOUT_S + REVOKE_COMMIT_TIMEOUT_S) * 1000)

ProcessorKind = Literal["fake", "sandbox", "stripe"]
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
        shown["stripe_api_key"] = "<set>" if self.stripe_api_key else None
        shown["kafka_sasl_password"] = "<set>" if self.kafka_sasl_password else None
        return f"Settings({shown})"


_SECRET_IN_URL = re.compile(r"(://[^:/@]*:)[^@]*@")


def redact_url(url: str | None) -> str | None:
    """A URL with its password replaced, fit for a log line."""
    return None if url is None else _SECRET_IN_URL.sub(r"\1***@", url)


# What `run` and `dev` choose for the settings left unset (None) above.
RUN_DEFAULTS: dict[str, Any] = {
    "migrate_on_start": False,
    "kafka_create_topics": False,
    "kafka_replication_factor": 3,
    "kafka_min_insync_replicas": 2,
}
DEV_DEFAULTS: dict[str, Any] = {
    "processor": "fake",
    "migrate_on_start": True,
    "kafka_create_topics": True,
    "kafka_replication_factor": 1,
    "kafka_min_insync_replicas": 1,
}


def _fill(settings: Settings, defaults: Mapping[str, Any]) -> Settings:
    unset = {k: v for k, v in defaults.items() if getattr(settings, k) is None}
    return msgspec.structs.replace(settings, **unset) if unset else settings


def run_defaults(settings: Settings) -> Settings:
    """`settings` with what `run` decides for unset ones; PAYMENT_PROCESSOR must be set."""
    if settings.processor is None:
        raise ConfigError(
            "PAYMENT_PROCESSOR: required by run (fake, sandbox or stripe); it has no default"
            " so that nothing is charged with the fake by accident"
        )
    filled = _fill(settings, RUN_DEFAULTS)
    _validate_replication(filled)
    return filled


def dev_defaults(settings: Settings) -> Settings:
    """`settings` with what `dev` decides for unset ones (the fake, migrations, topics)."""
    filled = _fill(settings, DEV_DEFAULTS)
    _validate_replication(filled)
    return filled


def _validate_replication(s: Settings) -> None:
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


def known_variables() -> frozenset[str]:
    """Every PAYMENT_* variable that names a setting (a secret's `…_FILE` too)."""
    names = {_env_name(f) for f in Settings.__struct_fields__}
    return frozenset(names | {_env_name(f) + FILE_SUFFIX for f in SECRET_FIELDS})


def check_unknown_variables(environ: Mapping[str, str]) -> None:
    """Fail on a PAYMENT_* variable that is no setting (a typo), naming the closest one."""
    known = known_variables()
    for name in sorted(environ):
        if (
            not name.startswith(PREFIX)
            or name in known
            or name in NON_SETTING_VARIABLES
            or name.startswith(NON_SETTING_PREFIXES)
        ):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else " (see the README for every setting)"
        raise ConfigError(f"{name}: unknown setting{hint}")


def _env_name(field: str) -> str:
    return PREFIX + field.upper()


def _coerce(field: str, raw: Any, annotation: Any) -> Any:
    """Convert a string (env) or TOML value to the field's type, or fail naming the variable."""
    name = _env_name(field)
    try:
        if isinstance(raw, str) and field == "kafka_sasl_password" and raw:
            # A password may begin or end with a space: only a file's newline is dropped.
            return raw
        if isinstance(raw, str):
            return msgspec.convert(_parse_scalar(raw, annotation), annotation, strict=False)
        return msgspec.convert(raw, annotation, strict=False)
    except (msgspec.ValidationError, ValueError):
        expected: list[Any] = []
        for arg in getattr(annotation, "__args__", ()):
            if get_origin(arg) is Literal:
                expected.extend(get_args(arg))
            elif arg is not type(None):
                expected.append(arg)
        if annotation in (bool, bool | None):
            hint = "true or false"
        elif expected and all(isinstance(a, str) for a in expected):
            hint = f"one of {', '.join(expected)}"
        elif expected:
            hint = " or ".join(_type_name(a) for a in expected)
        else:
            hint = _type_name(annotation)
        shown = "" if field in SECRET_FIELDS or "key" in field else f" {str(raw)[:60]!r}"
        raise ConfigError(f"{name}: invalid value{shown} (expected {hint})") from None


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _parse_scalar(raw: str, annotation: Any) -> Any:
    text = raw.strip()
    if text == "" and "None" in str(annotation):
        return None
    if annotation in (bool, bool | None):
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    if text == "" and "None" in str(annotation):
        return None
    return text


def load_settings(
    environ: Mapping[str, str] | None = None, config_file: str | Path | None = None
) -> Settings:
    """Settings from an optional TOML file, overridden by PAYMENT_* variables; validated."""
    environ = os.environ if environ is None else environ
    check_unknown_variables(environ)
    values: dict[str, Any] = {}
    hints = Settings.__annotations__
    types = {f: _resolve(hints[f]) for f in Settings.__struct_fields__}
    if config_file is not None:
        try:
            with open(config_file, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"--config: cannot read {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--config: {config_file} is not valid TOML: {exc}") from None
        data = _secrets_from_files(
            data, lambda field: field, lambda field: field + FILE_SUFFIX.lower(), "--config: "
        )
        for key, raw in data.items():
            if key not in types:
                close = difflib.get_close_matches(key, sorted(types), n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"--config: unknown setting {key!r} in {config_file}{hint}")
            values[key] = _coerce(key, raw, types[key])
    environ = _secrets_from_files(environ, _env_name, lambda field: _env_name(field) + FILE_SUFFIX)
    for field, annotation in types.items():
        raw = environ.get(_env_name(field))
        if raw is not None:
            values[field] = _coerce(field, raw, annotation)
    settings = Settings(**values)
    _validate(settings)
    return settings


def _secrets_from_files(
    source: Mapping[str, Any],
    name_of: Callable[[str], str],
    file_name_of: Callable[[str], str],
    where: str = "",
) -> dict[str, Any]:
    """`source` with each secret's `…_FILE` entry replaced by the file's content.

    A secret given both directly and as a file is an error: which one wins would be a
    guess. One trailing newline (what `echo` and editors add) is not part of the secret.
    """
    resolved = dict(source)
    for field in SECRET_FIELDS:
        name, file_name = name_of(field), file_name_of(field)
        path = resolved.pop(file_name, None)
        if path is None:
            continue
        if name in resolved:
            raise ConfigError(f"{where}{file_name}: {name} is set too; give one of them")
        resolved[name] = read_secret_file(f"{where}{file_name}", str(path))
    return resolved


def read_secret_file(name: str, path: str) -> str:
    """The secret held in the file at `path`, without its trailing newline."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: {path} is not UTF-8 text") from None
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret.strip():
        raise ConfigError(f"{name}: {path} is empty")
    return secret


def _resolve(annotation: Any) -> Any:
    # Settings uses `from __future__ import annotations`: hints are strings until evaluated.
    if isinstance(annotation, str):
        return eval(annotation, globals())
    return annotation


_URL = re.compile(r"postgres(ql)?://[^\s]+")
_HOST_PORT = re.compile(r"[A-Za-z0-9._\[\]:-]+:\d{1,5}")


def _validate(s: Settings) -> None:
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
    if s.max_amount < 1:
        raise ConfigError("PAYMENT_MAX_AMOUNT: must be at least 1")
    for field in (
        "db_pool_min",
        "db_pool_max",
        "max_in_flight",
        "processor_max_attempts",
        "relay_batch_size",
        "kafka_topic_partitions",
        "kafka_commit_interval_ms",
        "retention_batch_size",
    ):
        if getattr(s, field) < 1:
            raise ConfigError(f"{_env_name(field)}: must be at least 1")
    for field in (
        "lifecycle_log_per_s",
        "ready_max_outbox_age_s",
        "ready_max_in_flight_age_s",
        "ready_max_backlog",
        "retention_outbox_days",
        "retention_inbox_days",
    ):
        if getattr(s, field) < 0:
            raise ConfigError(f"{_env_name(field)}: must not be negative (0 turns it off)")
    if s.kafka_rebalance_timeout_ms < MIN_REBALANCE_TIMEOUT_MS:
        raise ConfigError(
            f"PAYMENT_KAFKA_REBALANCE_TIMEOUT_MS: must be at least {MIN_REBALANCE_TIMEOUT_MS}"
            f" (a revoked partition's drain, {DRAIN_TIMEOUT_S:g} s, plus its commit,"
            f" {REVOKE_COMMIT_TIMEOUT_S:g} s)"
        )
    if s.processor_max_concurrency is not None and s.processor_max_concurrency < 1:
        raise ConfigError("PAYMENT_PROCESSOR_MAX_CONCURRENCY: must be at least 1")
    if s.processor_max_rate is not None and s.processor_max_rate <= 0:
        raise ConfigError("PAYMENT_PROCESSOR_MAX_RATE: must be positive")
    if s.startup_timeout_s <= 0:
        raise ConfigError("PAYMENT_STARTUP_TIMEOUT_S: must be positive")
    if s.retention_interval_s <= 0:
        raise ConfigError("PAYMENT_RETENTION_INTERVAL_S: must be positive")
    if s.refund_interval_s <= 0:
        raise ConfigError("PAYMENT_REFUND_INTERVAL_S: must be positive")
    if s.refund_retry_after_s < 0:
        raise ConfigError("PAYMENT_REFUND_RETRY_AFTER_S: must not be negative")
    if s.db_pool_min > s.db_pool_max:
        raise ConfigError("PAYMENT_DB_POOL_MIN: must not exceed PAYMENT_DB_POOL_MAX")
    _validate_replication(s)
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
                f"{_env_name(field)}: set, but PAYMENT_KAFKA_SECURITY_PROTOCOL={protocol}"
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
                    f"{_env_name(field)}: required when PAYMENT_KAFKA_SECURITY_PROTOCOL={protocol}"
                )
    if s.kafka_ssl_keyfile is not None and s.kafka_ssl_certfile is None:
        raise ConfigError(
            "PAYMENT_KAFKA_SSL_KEYFILE: set without PAYMENT_KAFKA_SSL_CERTFILE (the client"
            " certificate it belongs to)"
        )
    for field in tls:
        path = getattr(s, field)
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"{_env_name(field)}: cannot read {path}")
