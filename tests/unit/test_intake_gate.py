"""The intake gate: closed above the high-water mark, open again below the low one, and a
failed probe changes nothing (the last state stays, one warning per outage)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import psycopg
import pytest
from dependency_injector import providers

from payment.adapters.kafka.consumer.intake_gate import (
    ALWAYS_OPEN,
    EPISODE_QUIET_S,
    OutboxBacklogGate,
    backlog_marks,
)
from payment.adapters.observability.metrics import Metrics
from payment.bootstrap import make_container
from payment.settings import Settings
from support.waiting import eventually


class Readings:
    """A probe answering the counts (or raising the errors) queued in it, in order; the
    last one again and again."""

    def __init__(self, *readings: int | Exception) -> None:
        self.readings: list[int | Exception] = list(readings)
        self.limits: list[int] = []

    async def __call__(self, limit: int) -> int:
        self.limits.append(limit)
        reading = self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]
        if isinstance(reading, Exception):
            raise reading
        return reading


def gate(probe: Readings | None = None, metrics: Metrics | None = None) -> OutboxBacklogGate:
    return OutboxBacklogGate(
        probe or Readings(), high=2000, low=1000, metrics=metrics or Metrics(), interval_s=0
    )


def outage() -> Exception:
    return psycopg.OperationalError("connection refused")


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.INFO, logger="payment.adapters.kafka.consumer.intake_gate"):
        yield caplog


def test_the_marks_follow_the_relay_pass_size() -> None:
    assert backlog_marks(500) == (2000, 1000)
    made = OutboxBacklogGate.for_relay(Readings(), 100, metrics=Metrics())
    assert (made.high, made.low) == (400, 200)


def test_the_container_gives_the_consumer_a_gate_with_the_relays_marks() -> None:
    container = make_container(Settings(processor="fake", relay_batch_size=100))
    container.control_pool.override(providers.Object(object()))  # not opened here
    made = container.intake_gate()
    assert isinstance(made, OutboxBacklogGate) and (made.high, made.low) == (400, 200)
    assert container.consumer.kwargs["intake"] is container.intake_gate
    assert container.running_workers.kwargs["intake_gate"] is container.intake_gate  # probing


def test_the_gate_opens_and_closes_only_past_its_marks() -> None:
    g = gate()
    assert g.admits_requests  # open before the first reading
    for count, admits in [
        (0, True),
        (2000, True),  # at the high mark: still open
        (2001, False),  # above it: closed
        (1500, False),  # between the marks: stays closed (hysteresis)
        (1000, False),  # at the low mark: still closed
        (999, True),  # below it: open
        (1500, True),  # between the marks: stays open
        (2001, False),
    ]:
        g.observe(count)
        assert g.admits_requests is admits, count


def test_an_overload_episode_warns_once_and_its_flaps_are_counted_not_logged(
    warnings: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    now = [0.0]
    g = OutboxBacklogGate(
        Readings(), high=2000, low=1000, metrics=metrics, interval_s=0, clock=lambda: now[0]
    )
    for count in (2001, 2001, 1500, 999, 500):  # one pause, one resume
        g.observe(count)
    now[0] += EPISODE_QUIET_S - 1
    for count in (2001, 999):  # a flap within the episode
        g.observe(count)
    now[0] += EPISODE_QUIET_S  # open long enough: the next pause is a new episode
    g.observe(2001)

    lines = [(r.levelno, r.getMessage()) for r in warnings.records]
    pausing = [level for level, line in lines if "pausing request intake" in line]
    resuming = [line for level, line in lines if "resuming" in line]
    assert pausing == [logging.WARNING, logging.WARNING]
    assert resuming == [
        "intake gate: outbox backlog down to 999 rows; resuming request intake"
        " (pauses within 60 s are logged at DEBUG)"
    ]
    text = asyncio.run(metrics.render())
    assert "payment_consumer_intake_pauses_total 3" in text


async def test_a_failed_probe_keeps_the_last_state_and_warns_once_per_outage(
    warnings: pytest.LogCaptureFixture,
) -> None:
    probe = Readings(2001, outage(), outage(), TimeoutError(), 1500, outage(), 999)
    g = gate(probe)

    await g.probe_once()
    assert not g.admits_requests
    for _ in range(3):  # the database is down: still closed, not reopened nor crashed
        await g.probe_once()
        assert not g.admits_requests
    await g.probe_once()  # back: 1500 is not below the low mark
    assert not g.admits_requests and g.backlog == 1500
    await g.probe_once()  # a second outage
    assert not g.admits_requests
    await g.probe_once()
    assert g.admits_requests

    failures = [r for r in warnings.records if "cannot read the outbox backlog" in r.getMessage()]
    assert len(failures) == 2  # one per outage, not one per probe
    assert all(r.levelno == logging.WARNING for r in failures)
    assert probe.limits == [2001] * 7  # never counts past what decides the state


async def test_a_failed_probe_leaves_an_open_gate_open() -> None:
    g = gate(Readings(outage()))
    await g.probe_once()
    assert g.admits_requests and g.backlog is None


async def test_run_probes_until_cancelled() -> None:
    probe = Readings(10, outage(), 2500, 1500)
    g = gate(probe)
    running = asyncio.create_task(g.run())
    try:
        await eventually(lambda: not g.admits_requests, what="the gate closed")
        await eventually(lambda: len(probe.limits) > 3, what="probing went on")
    finally:
        running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert not g.admits_requests


def test_the_marks_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="low <= high"):
        OutboxBacklogGate(Readings(), high=10, low=20, metrics=Metrics())


def test_without_a_gate_requests_are_always_admitted() -> None:
    assert ALWAYS_OPEN.admits_requests
