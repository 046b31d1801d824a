"""The composition root's execution policy follows the configured processor."""

from __future__ import annotations

import pytest

from payment.adapters.processors.stripe import IDEMPOTENCY_KEY_LIFETIME_S
from payment.bootstrap import make_container
from payment.settings import ProcessorKind, Settings


@pytest.mark.parametrize(
    ("kind", "lifetime"),
    [
        ("fake", None),
        ("sandbox", IDEMPOTENCY_KEY_LIFETIME_S),
        ("stripe", IDEMPOTENCY_KEY_LIFETIME_S),
    ],
)
def test_the_policy_knows_how_long_the_gateway_keeps_idempotency_keys(
    kind: ProcessorKind, lifetime: float | None
) -> None:
    settings = Settings(
        processor=kind, processor_timeout_ms=2500, processor_max_attempts=3, review_after_s=120.0
    )

    policy = make_container(settings).policy()

    assert policy.key_lifetime_s == lifetime
    # The LimitedProcessor bounds each call; the handlers' own timeout would count the
    # wait for a slot under the gateway's limits.
    assert (policy.call_timeout_s, policy.max_attempts, policy.review_after_s) == (None, 3, 120.0)


@pytest.mark.parametrize(
    ("kind", "concurrency", "rate"),
    [("fake", 1024, 10_000.0), ("sandbox", 16, 20.0), ("stripe", 64, 80.0)],
)
def test_each_processor_kind_has_limits_within_its_gateway_and_settings_override_them(
    kind: ProcessorKind, concurrency: int, rate: float
) -> None:
    limits = make_container(Settings(processor=kind)).limits()
    assert (limits.max_concurrency, limits.max_rate) == (concurrency, rate)

    limits = make_container(
        Settings(processor=kind, processor_max_concurrency=3, processor_max_rate=7.5)
    ).limits()
    assert (limits.max_concurrency, limits.max_rate) == (3, 7.5)


def test_the_limits_are_read_from_the_environment_and_checked() -> None:
    from payment.settings import ConfigError, load_settings

    settings = load_settings(
        {"PAYMENT_PROCESSOR_MAX_CONCURRENCY": "12", "PAYMENT_PROCESSOR_MAX_RATE": "7.5"}
    )
    assert (settings.processor_max_concurrency, settings.processor_max_rate) == (12, 7.5)
    with pytest.raises(ConfigError, match="PAYMENT_PROCESSOR_MAX_RATE"):
        load_settings({"PAYMENT_PROCESSOR_MAX_RATE": "0"})
    with pytest.raises(ConfigError, match="PAYMENT_PROCESSOR_MAX_CONCURRENCY"):
        load_settings({"PAYMENT_PROCESSOR_MAX_CONCURRENCY": "0"})
