"""What several commands need: the database URL, the Kafka clients' checked security."""

from __future__ import annotations

from typing import TYPE_CHECKING

from payment.settings import ConfigError, Settings

if TYPE_CHECKING:
    from payment.adapters.kafka.security import KafkaSecurity


def require_database(settings: Settings) -> str:
    if not settings.database_url:
        raise ConfigError("PAYMENT_DATABASE_URL: not set (dev starts an embedded PostgreSQL)")
    return settings.database_url


async def checked_kafka_security(settings: Settings) -> KafkaSecurity:
    """The Kafka clients' security settings, once a broker accepted them (else one line)."""
    from payment.bootstrap import make_container
    from payment.runtime.preflight import check_kafka

    security: KafkaSecurity = make_container(settings).kafka_security()
    await check_kafka(str(settings.kafka_bootstrap_servers), security)
    return security
