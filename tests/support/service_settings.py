"""Settings for a service composed inside a test: its own topics, group and HTTP port."""

from __future__ import annotations

from typing import Any

from payment.settings import Settings


def isolated_settings(
    prefix: str, *, database_url: str, bootstrap: str, **overrides: Any
) -> Settings:
    """Settings whose topics and consumer group are named after `prefix` (unique per test),
    with HTTP on a free loopback port, the fake processor, migrations and topics created
    at start on the single test broker; `overrides` sets anything else."""
    chosen: dict[str, Any] = {
        "processor": "fake",
        "migrate_on_start": True,
        "kafka_create_topics": True,
        "kafka_replication_factor": 1,
        "kafka_min_insync_replicas": 1,
        **overrides,
    }
    return Settings(
        database_url=database_url,
        kafka_bootstrap_servers=bootstrap,
        consumer_group=f"{prefix}-group",
        topic_request=f"{prefix}.request",
        topic_initiated=f"{prefix}.initiated",
        topic_completed=f"{prefix}.completed",
        topic_failed=f"{prefix}.failed",
        topic_dead_letter=f"{prefix}.dead_letter",
        topic_refund=f"{prefix}.refund",
        topic_refunded=f"{prefix}.refunded",
        topic_refund_failed=f"{prefix}.refund_failed",
        http_host="127.0.0.1",
        http_port=0,
        **chosen,
    )


def topics_of(settings: Settings) -> list[str]:
    """The service's topics, the request topic first."""
    return [
        settings.topic_request,
        settings.topic_initiated,
        settings.topic_completed,
        settings.topic_failed,
        settings.topic_dead_letter,
        settings.topic_refund,
        settings.topic_refunded,
        settings.topic_refund_failed,
    ]
