"""What `run` and `dev` decide for the settings left unset (None)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from payment.settings.model import ConfigError, Settings
from payment.settings.validation import validate_replication

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
    validate_replication(filled)
    return filled


def dev_defaults(settings: Settings) -> Settings:
    """`settings` with what `dev` decides for unset ones (the fake, migrations, topics)."""
    filled = _fill(settings, DEV_DEFAULTS)
    validate_replication(filled)
    return filled
