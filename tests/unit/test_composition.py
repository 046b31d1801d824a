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
    assert (policy.call_timeout_s, policy.max_attempts, policy.review_after_s) == (2.5, 3, 120.0)
