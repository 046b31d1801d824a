"""Metrics: OpenTelemetry instruments rendered in the Prometheus text format."""

from __future__ import annotations

import re

import pytest

from payment.adapters.observability.metrics import Metrics
from payment.adapters.observability.prometheus import prometheus_name

_SAMPLE = re.compile(
    r"[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? [-+]?([0-9.]+([eE][-+]?[0-9]+)?|NaN|[-+]?Inf)"
)


def lines_of(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


@pytest.mark.parametrize(
    ("name", "unit", "kind", "expected"),
    [
        ("payment.requests.received", "{request}", "counter", "payment_requests_received_total"),
        ("payment.outbox.oldest_age", "s", "gauge", "payment_outbox_oldest_age_seconds"),
        ("payment.call.duration", "s", "histogram", "payment_call_duration_seconds"),
        ("http.server.duration_seconds", "s", "histogram", "http_server_duration_seconds"),
        ("disk.usage", "By", "gauge", "disk_usage_bytes"),
        ("cpu.utilization", "1", "gauge", "cpu_utilization_ratio"),
        ("jobs.done_total", "", "counter", "jobs_done_total"),
        ("weird-name..x", "", "gauge", "weird_name_x"),
    ],
)
def test_prometheus_names_follow_the_compatibility_rules(
    name: str, unit: str, kind: str, expected: str
) -> None:
    assert prometheus_name(name, unit, kind) == expected  # type: ignore[arg-type]


async def test_every_declared_series_is_listed_before_any_traffic() -> None:
    text = await Metrics().render()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            assert line.split()[3] in ("counter", "gauge", "histogram")
        elif not line.startswith("# HELP "):
            assert _SAMPLE.fullmatch(line), line
    for family in (
        "payment_requests_received_total",
        "payment_outcomes_total",
        "payment_processor_call_duration_seconds",
        "payment_time_to_outcome_seconds",
        "payment_consumer_lag",
        "payment_outbox_backlog",
    ):
        assert f"# TYPE {family} " in text
    # Counters that alerts divide by start at 0 rather than being absent.
    assert "payment_requests_received_total 0" in text
    assert 'payment_outcomes_total{outcome="failed",reason="declined"} 0' in text


async def test_counters_and_histograms_render_cumulatively() -> None:
    metrics = Metrics()
    metrics.requests_received.add(3)
    labels = {"processor": "fake", "operation": "charge", "result": "approved"}
    for seconds in (0.003, 0.02, 0.02, 7.0, 100.0):
        metrics.processor_call_duration.record(seconds, labels)
    text = await metrics.render()
    assert "payment_requests_received_total 3" in text
    name = "payment_processor_call_duration_seconds"
    labels_text = 'operation="charge",processor="fake",result="approved"'
    buckets = lines_of(text, f"{name}_bucket{{")
    assert all(labels_text in line for line in buckets), buckets
    by_bound = {_le_of(line): float(line.rsplit(" ", 1)[1]) for line in buckets}
    assert by_bound["0.005"] == 1
    assert by_bound["0.025"] == 3
    assert by_bound["10.0"] == 4
    assert by_bound["+Inf"] == 5
    assert float(lines_of(text, f"{name}_count{{{labels_text}}} ")[0].rsplit(" ", 1)[1]) == 5
    [total] = lines_of(text, f"{name}_sum{{")
    assert float(total.rsplit(" ", 1)[1]) == pytest.approx(107.043)
    counts = [float(line.rsplit(" ", 1)[1]) for line in buckets]
    assert counts == sorted(counts)


def _le_of(line: str) -> str:
    match = re.search(r'le="([^"]+)"', line)
    assert match is not None, line
    return match.group(1)


async def test_observed_gauges_come_from_collectors_run_at_scrape_time() -> None:
    metrics = Metrics()
    backlog = [7]

    async def collect() -> None:
        metrics.observe("payment.outbox.backlog", [(backlog[0], {})])
        metrics.observe(
            "payment.consumer.lag",
            [(3, {"topic": "t", "partition": "0"}), (0, {"topic": "t", "partition": "1"})],
        )

    metrics.add_collector(collect)
    text = await metrics.render()
    assert "payment_outbox_backlog 7" in text
    assert 'payment_consumer_lag{partition="0",topic="t"} 3' in text
    backlog[0] = 2
    assert "payment_outbox_backlog 2" in await metrics.render()


async def test_a_failing_collector_leaves_its_gauges_out_not_stale() -> None:
    metrics = Metrics()
    fail = [False]

    async def collect() -> None:
        if fail[0]:
            raise ConnectionError("database down")
        metrics.observe("payment.outbox.backlog", [(5, {})])

    metrics.add_collector(collect)
    assert "payment_outbox_backlog 5" in await metrics.render()
    fail[0] = True
    text = await metrics.render()
    assert "# TYPE payment_outbox_backlog gauge" in text
    assert not lines_of(text, "payment_outbox_backlog ")


async def test_label_values_are_escaped() -> None:
    metrics = Metrics()
    metrics.handler_retries.add(1, {"kind": 'we"ird\\va\nlue'})
    text = await metrics.render()
    assert 'payment_handler_retries_total{kind="we\\"ird\\\\va\\nlue"} 1' in text


def test_observing_an_unknown_instrument_is_a_bug() -> None:
    with pytest.raises(KeyError):
        Metrics().observe("payment.nope", [(1, {})])
