"""/health/ready's backlog check: messages waiting against the configured limit."""

from __future__ import annotations

from payment.runtime.readiness import backlog_check


def test_readiness_reflects_the_backlog() -> None:
    assert backlog_check(10_000, 10_000) == {"backlog": "ok"}
    assert backlog_check(100_000, 10_000) == {
        "backlog": "100000 messages or payments waiting (limit 10000)"
    }
    assert backlog_check(100_000, 0) == {}
