"""LogBudget: per-message lines while few, a summary of the left-out ones when many."""

from __future__ import annotations

import logging

import pytest

from payment.adapters.observability.log_budget import LogBudget


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_within_the_budget_are_allowed_and_the_rest_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    budget = LogBudget(3, clock=clock)
    with caplog.at_level(logging.INFO, logger="payment.lifecycle"):
        allowed = [budget.allow("published") for _ in range(5)]
        assert allowed == [True, True, True, False, False]
        assert budget.allow("payment completed") is False
        assert caplog.records == []

        clock.now += 1.5
        assert budget.allow("published") is True
    [summary] = caplog.records
    assert summary.levelno == logging.INFO
    text = summary.getMessage()
    assert text.startswith("3 lifecycle lines left out in the last 1.5 s (over 3/s)")
    assert "published 2" in text and "payment completed 1" in text
    assert budget.skipped_total == 3


def test_the_summary_counts_against_the_next_second(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    budget = LogBudget(2, clock=clock)
    with caplog.at_level(logging.INFO, logger="payment.lifecycle"):
        for _ in range(4):
            budget.allow("x")
        clock.now += 1.0
        assert [budget.allow("x") for _ in range(3)] == [True, False, False]


def test_a_quiet_second_writes_no_summary(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    budget = LogBudget(2, clock=clock)
    with caplog.at_level(logging.INFO, logger="payment.lifecycle"):
        assert budget.allow("x") and budget.allow("x")
        clock.now += 5
        assert budget.allow("x")
    assert caplog.records == []


def test_zero_means_no_limit() -> None:
    budget = LogBudget(0)
    assert all(budget.allow("x") for _ in range(10_000))
    assert budget.skipped_total == 0
    with pytest.raises(ValueError):
        LogBudget(-1)


def test_the_summary_is_written_by_the_timer_when_no_line_follows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    budget = LogBudget(1, clock=clock)
    with caplog.at_level(logging.INFO, logger="payment.lifecycle"):
        assert [budget.allow("published") for _ in range(3)] == [True, False, False]
        budget.flush()  # the second is not over yet: nothing to say
        assert caplog.records == []
        clock.now += 1.0
        budget.flush()  # the traffic stopped; the timer writes the summary
        budget.flush()  # once
    [summary] = caplog.records
    assert summary.getMessage().startswith("2 lifecycle lines left out in the last 1.0 s")


async def test_run_flushes_on_its_interval(caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    clock = Clock()
    budget = LogBudget(1, clock=clock)
    budget.allow("published")
    budget.allow("published")
    clock.now += 2.0
    with caplog.at_level(logging.INFO, logger="payment.lifecycle"):
        task = asyncio.create_task(budget.run(interval_s=0))
        for _ in range(10):  # a few turns of the loop: the first one flushes
            await asyncio.sleep(0)
        task.cancel()
    assert caplog.records[0].getMessage().startswith("1 lifecycle lines left out")
