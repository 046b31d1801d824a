"""Configuration (contract section 5): PAYMENT_* environment variables over a TOML file.

`model` holds the one `Settings` and the exit codes, `loading` reads the environment and
the file, `validation` checks what was read, `defaults` fills what `run` and `dev` decide.
"""

from payment.adapters.processors import ProcessorKind
from payment.settings.defaults import DEV_DEFAULTS, RUN_DEFAULTS, dev_defaults, run_defaults
from payment.settings.loading import (
    check_unknown_variables,
    known_variables,
    load_settings,
    read_secret_file,
)
from payment.settings.model import (
    DRAIN_TIMEOUT_S,
    EXIT_CONFIGURATION,
    EXIT_UNAVAILABLE,
    MIN_REBALANCE_TIMEOUT_MS,
    REVOKE_COMMIT_TIMEOUT_S,
    SECRET_FIELDS,
    ConfigError,
    DependencyUnavailable,
    KafkaSaslMechanism,
    KafkaSecurityProtocol,
    Settings,
    redact_url,
)
from payment.settings.validation import env_name, validate

__all__ = [
    "DEV_DEFAULTS",
    "DRAIN_TIMEOUT_S",
    "EXIT_CONFIGURATION",
    "EXIT_UNAVAILABLE",
    "MIN_REBALANCE_TIMEOUT_MS",
    "REVOKE_COMMIT_TIMEOUT_S",
    "RUN_DEFAULTS",
    "SECRET_FIELDS",
    "ConfigError",
    "DependencyUnavailable",
    "KafkaSaslMechanism",
    "KafkaSecurityProtocol",
    "ProcessorKind",
    "Settings",
    "check_unknown_variables",
    "dev_defaults",
    "env_name",
    "known_variables",
    "load_settings",
    "read_secret_file",
    "redact_url",
    "run_defaults",
    "validate",
]
