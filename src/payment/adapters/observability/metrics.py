"""The service's metrics: OpenTelemetry instruments, read in process, rendered as Prometheus text.

Why the OpenTelemetry metrics SDK rather than a registry of our own: the instruments are
the standard API (anything else in the process, and a later OTLP metric export, sees the
same series), and the SDK does the aggregation, cardinality limits and histogram buckets.
What it lacks without `prometheus_client` is the text format, which is small and written
here (`render_prometheus`), following the OpenTelemetry "Prometheus and OpenMetrics
compatibility" naming: dots become underscores, the unit becomes a suffix (`s` ->
`_seconds`; a `{annotation}` unit adds nothing) and a monotonic sum gets `_total`.

Gauges that describe shared state (the outbox backlog, payments in flight, consumer lag)
are observable instruments. Their values come from async *collectors* run at scrape time
(`add_collector`), which may query PostgreSQL or the broker; a collector that fails or
times out leaves its gauges out of that scrape rather than showing stale numbers.

Label values are bounded sets chosen by the code (results, reasons, topics, partitions),
never user input: no booking id, payment id or payment method is ever a label.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Final, Literal

from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    MetricReader,
    NumberDataPoint,
    Sum,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData
from opentelemetry.sdk.resources import Resource

log = logging.getLogger(__name__)

Attributes = Mapping[str, str]
Collector = Callable[[], Awaitable[None]]
Kind = Literal["counter", "gauge", "histogram"]

METER_NAME: Final = "payment"
# Gateway calls: a fake answers in microseconds, Stripe in hundreds of milliseconds.
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Request -> outcome spans a normal payment (well under a second) and a reconciled one
# (minutes, up to the review window).
OUTCOME_BUCKETS: Final = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
)  # fmt: skip
COLLECT_TIMEOUT_S: Final = 2.0

FAILURE_REASONS: Final = ("declined", "invalid_request", "processor_unavailable")


class _Declared:
    __slots__ = ("help", "kind", "name", "unit")

    def __init__(self, name: str, unit: str, kind: Kind, help_text: str) -> None:
        self.name = name
        self.unit = unit
        self.kind = kind
        self.help = help_text


class Metrics:
    """Every series of the service, as named OpenTelemetry instruments.

    Synchronous instruments are public attributes (`metrics.requests_received.add(1)`);
    observable gauges and counters are fed by collectors through `observe`.
    """

    def __init__(self, *, readers: Sequence[MetricReader] = ()) -> None:
        self._reader = InMemoryMetricReader()
        self._provider = MeterProvider(
            metric_readers=[self._reader, *readers],
            resource=Resource.create({"service.name": "payment-service"}),
            shutdown_on_exit=False,
        )
        meter = self._provider.get_meter(METER_NAME)
        self._declared: dict[str, _Declared] = {}
        self._collectors: list[Collector] = []
        self._observed: dict[str, list[tuple[float, Attributes]]] = {}
        # Values set once (build info) that every scrape shows, whatever the collectors do.
        self._static: dict[str, list[tuple[float, Attributes]]] = {}
        self._scrape_lock = asyncio.Lock()

        # -- inbound -------------------------------------------------------------------
        self.requests_received = self._counter(
            meter, "payment.requests.received", "{request}",
            "deliveries on the request topic (redeliveries and poison included)",
        )  # fmt: skip
        self.requests_deduplicated = self._counter(
            meter, "payment.requests.deduplicated", "{request}",
            "requests already handled (same ce_source and ce_id): nothing changed",
        )  # fmt: skip
        self.requests_invalid = self._counter(
            meter, "payment.requests.invalid", "{request}",
            "requests that broke a rule: answered with payment.failed / invalid_request",
        )  # fmt: skip
        self.requests_handled = self._counter(
            meter, "payment.requests.handled", "{request}",
            "requests by result: accepted, duplicate, rejected, replayed, in_flight",
        )  # fmt: skip
        self.messages_dead_lettered = self._counter(
            meter, "payment.messages.dead_lettered", "{message}",
            "messages parked on the dead-letter topic, by source topic and cause",
        )  # fmt: skip
        self.handler_retries = self._counter(
            meter, "payment.handler.retries", "{retry}",
            "handler retries: transient (database or broker outage) or error (a bug)",
        )  # fmt: skip
        self.executions = self._counter(
            meter, "payment.executions", "{message}",
            "payment.initiated messages executed, by result",
        )  # fmt: skip
        self.execution_duration = self._histogram(
            meter, "payment.execution.duration", "s",
            "time to execute one payment.initiated message (gateway calls and database)",
            LATENCY_BUCKETS,
        )  # fmt: skip
        self.consumer_offset_resets = self._counter(
            meter, "payment.consumer.offset_resets", "{reset}",
            "partitions whose reading restarted from the log's start: no_offset (never "
            "committed) or out_of_range (committed offset deleted or past the log's end)",
        )  # fmt: skip
        self.consumer_records_skipped = self._counter(
            meter, "payment.consumer.records_skipped", "{message}",
            "records deleted from the log before this group handled them (lost)",
        )  # fmt: skip
        # -- payments --------------------------------------------------------------------
        self.payments_initiated = self._counter(
            meter, "payment.payments.initiated", "{payment}", "payments initiated (committed)"
        )
        self.outcomes = self._counter(
            meter, "payment.outcomes", "{payment}",
            "terminal outcomes committed, by outcome (completed, failed) and failure reason",
        )  # fmt: skip
        self.time_to_outcome = self._histogram(
            meter, "payment.time_to_outcome", "s",
            "from the request's receipt (payment initiated) to its terminal event's commit",
            OUTCOME_BUCKETS,
        )  # fmt: skip
        self.payments_flagged = self._counter(
            meter, "payment.payments.flagged", "{payment}",
            "payments flagged for manual review (outcome unknown past the review window)",
        )  # fmt: skip
        self.refunds = self._counter(
            meter, "payment.refunds", "{refund}",
            "refund events committed, by result (requested, refunded, failed) and failure reason",
        )  # fmt: skip
        self.refund_requests_handled = self._counter(
            meter, "payment.refund_requests.handled", "{request}",
            "refund requests by result: accepted, duplicate, rejected, refused, closed",
        )  # fmt: skip
        # -- processor -------------------------------------------------------------------
        self.processor_call_duration = self._histogram(
            meter, "payment.processor.call.duration", "s",
            "gateway call latency by processor, operation (charge, lookup) and result",
            LATENCY_BUCKETS,
        )  # fmt: skip
        self.processor_errors = self._counter(
            meter, "payment.processor.errors", "{call}",
            "gateway calls without an outcome, by kind: unavailable, unknown, timeout, error",
        )  # fmt: skip
        # -- observed at scrape time ---------------------------------------------------------
        self._observable_gauge(
            meter, "payment.outbox.backlog", "{row}", "outbox rows not yet published"
        )
        self._observable_gauge(
            meter, "payment.outbox.oldest_age", "s",
            "age of the oldest unpublished outbox row (0 when none)",
        )  # fmt: skip
        self._observable_gauge(
            meter, "payment.payments.in_flight", "{payment}",
            "payments initiated and not yet terminal (not counting those flagged for review)",
        )  # fmt: skip
        self._observable_gauge(
            meter, "payment.payments.in_flight.oldest_age", "s",
            "age of the oldest in-flight payment not flagged for review (0 when none)",
        )  # fmt: skip
        self._observable_gauge(
            meter, "payment.payments.review_pending", "{payment}",
            "unresolved payments flagged for manual review",
        )  # fmt: skip
        self._observable_gauge(
            meter, "payment.consumer.lag", "{message}",
            "per assigned partition: broker highwater minus the consumer's position",
        )  # fmt: skip
        self._observable_gauge(
            meter, "payment.processor.in_flight", "{call}",
            "gateway calls in flight now (at most PAYMENT_PROCESSOR_MAX_CONCURRENCY)",
        )  # fmt: skip
        self._observable_gauge(
            meter, "payment.processor.in_flight_max", "{call}",
            "the most gateway calls this instance had in flight at once since it started",
        )  # fmt: skip
        self._observable_gauge(
            meter, "payment.processor.waiting", "{call}",
            "gateway calls waiting for a slot under the bulkhead",
        )  # fmt: skip
        self._observable_gauge(
            meter, "payment.processor.rate_limit", "{call}",
            "gateway calls per second allowed now: PAYMENT_PROCESSOR_MAX_RATE, less after a 429",
        )  # fmt: skip
        self._observable_counter(
            meter, "payment.processor.throttled", "{call}",
            "gateway answers 429 (rate limited): the call was sent again after Retry-After",
        )  # fmt: skip
        self._observable_counter(
            meter, "payment.reconciler.actions", "{action}",
            "reconciler results per in-flight payment it looked at, and failed rounds",
        )  # fmt: skip
        self._observable_counter(
            meter, "payment.refund_worker.actions", "{action}",
            "refund worker results per pending refund it settled, and failed rounds",
        )  # fmt: skip
        self._observable_counter(
            meter, "payment.outbox.published", "{row}", "outbox rows published by this instance"
        )
        self._observable_counter(
            meter, "payment.outbox.send_failures", "{row}",
            "outbox sends the broker did not acknowledge (retried)",
        )  # fmt: skip

        self._observable_gauge(
            meter, "payment.build.info", "",
            "always 1: the running version and the processor in use (a label each)",
        )  # fmt: skip
        # -- the instance: process, pools, relay, retention, the scrape itself -----------
        self._observable_counter(
            meter, "process.cpu", "s", "CPU time of this process, user and system"
        )
        self._observable_gauge(
            meter, "process.resident_memory", "By", "resident memory of this process"
        )
        self._observable_gauge(
            meter, "process.open_fds", "{fd}", "file descriptors this process has open"
        )
        self._observable_gauge(
            meter, "process.max_fds", "{fd}", "the process's limit of open file descriptors"
        )
        self._observable_gauge(
            meter, "process.start_time", "s", "when the process started (seconds since the epoch)"
        )
        self._observable_gauge(
            meter, "payment.db.pool.connections", "{connection}",
            "connections of a database pool (main: handlers; control: relay, health, metrics,"
            " retention), by state: used or idle",
        )  # fmt: skip
        self._observable_gauge(
            meter, "payment.db.pool.max", "{connection}", "the most connections a pool may open"
        )
        self._observable_gauge(
            meter, "payment.db.pool.waiting", "{request}",
            "requests waiting for a connection of the pool now",
        )  # fmt: skip
        self._observable_counter(
            meter, "payment.db.pool.waits", "{request}",
            "requests that had to wait for a connection (none was free)",
        )  # fmt: skip
        self._observable_counter(
            meter, "payment.db.pool.wait", "s", "time requests spent waiting for a connection"
        )
        self._observable_counter(
            meter, "payment.db.pool.errors", "{request}",
            "requests that got no connection (timed out waiting, or the pool failed)",
        )  # fmt: skip
        self._observable_gauge(
            meter, "payment.outbox.relay_leader", "{instance}",
            "1 while this instance's relay holds the leadership and publishes, else 0",
        )  # fmt: skip
        self._observable_counter(
            meter, "payment.retention.purged", "{row}",
            "rows purged by retention, by table: outbox (published rows) or inbox (marks)",
        )  # fmt: skip
        self._observable_counter(
            meter, "payment.retention.failed_rounds", "{round}",
            "retention rounds that failed (the database refused or was unreachable)",
        )  # fmt: skip
        self.collector_failures = self._counter(
            meter, "payment.metrics.collector_failures", "{scrape}",
            "scrapes in which a collector failed or timed out (its series were left out)",
        )  # fmt: skip

        # Series that should read 0 rather than be absent before the first event, so
        # rate() and alerts work from the start.
        for counter in (
            self.requests_received,
            self.requests_deduplicated,
            self.requests_invalid,
            self.payments_initiated,
            self.payments_flagged,
        ):
            counter.add(0)
        self.outcomes.add(0, {"outcome": "completed"})
        for reason in FAILURE_REASONS:
            self.outcomes.add(0, {"outcome": "failed", "reason": reason})

    # -- declaring -------------------------------------------------------------------------

    def _declare(self, name: str, unit: str, kind: Kind, help_text: str) -> None:
        self._declared[name] = _Declared(name, unit, kind, help_text)

    def _counter(self, meter: Meter, name: str, unit: str, help_text: str) -> Counter:
        self._declare(name, unit, "counter", help_text)
        return meter.create_counter(name, unit=unit, description=help_text)

    def _histogram(
        self, meter: Meter, name: str, unit: str, help_text: str, buckets: Sequence[float]
    ) -> Histogram:
        self._declare(name, unit, "histogram", help_text)
        return meter.create_histogram(
            name, unit=unit, description=help_text, explicit_bucket_boundaries_advisory=buckets
        )

    def _observable_gauge(self, meter: Meter, name: str, unit: str, help_text: str) -> None:
        self._declare(name, unit, "gauge", help_text)
        meter.create_observable_gauge(
            name, callbacks=[self._callback(name)], unit=unit, description=help_text
        )

    def _observable_counter(self, meter: Meter, name: str, unit: str, help_text: str) -> None:
        self._declare(name, unit, "counter", help_text)
        meter.create_observable_counter(
            name, callbacks=[self._callback(name)], unit=unit, description=help_text
        )

    def _callback(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            observed = self._observed.get(name, ())
            return [Observation(value, dict(attrs)) for value, attrs in observed]

        return observe

    # -- observing -----------------------------------------------------------------------

    def add_collector(self, collect: Collector) -> None:
        """An async callback run before each scrape; it reports values through `observe`."""
        self._collectors.append(collect)
        # Its failure counter reads 0 from the start, so an alert on its increase works.
        self.collector_failures.add(0, {"collector": getattr(collect, "__name__", "collector")})

    def remove_collector(self, collect: Collector) -> None:
        """Stop running a collector (its service stopped); unknown ones are ignored."""
        if collect in self._collectors:
            self._collectors.remove(collect)

    def set_build_info(self, *, processor: str, version: str | None = None) -> None:
        """`payment_build_info{version, processor} 1` from now on, on every scrape."""
        self._static["payment.build.info"] = [
            (1, {"version": version or package_version(), "processor": processor})
        ]

    def observe(self, name: str, values: Iterable[tuple[float, Attributes]]) -> None:
        """Set the current values of an observable instrument (a collector calls this)."""
        if name not in self._declared:
            raise KeyError(f"no observable instrument {name!r}")
        self._observed[name] = list(values)

    async def collect(self) -> None:
        """Run every collector once (each bounded by a timeout); failures are left out."""
        self._observed = dict(self._static)
        for collect in self._collectors:
            try:
                async with asyncio.timeout(COLLECT_TIMEOUT_S):
                    await collect()
            except Exception as exc:  # a failed collector must not break the scrape
                name = getattr(collect, "__name__", "collector")
                self.collector_failures.add(1, {"collector": name})
                log.debug("metrics: collector %s failed: %s", name, type(exc).__name__)

    async def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4) of every series."""
        async with self._scrape_lock:
            await self.collect()
            data = self._reader.get_metrics_data()
        metrics: list[Metric] = []
        if data is not None:
            for resource_metrics in data.resource_metrics:
                for scope_metrics in resource_metrics.scope_metrics:
                    metrics.extend(scope_metrics.metrics)
        return render_prometheus(metrics, self._declared.values())

    def shutdown(self) -> None:
        self._provider.shutdown()


def observe_pools(metrics: Metrics, stats: Mapping[str, Mapping[str, int]]) -> None:
    """The pool series from psycopg_pool's `get_stats()` of each named pool."""
    used: list[tuple[float, Attributes]] = []
    gauges: dict[str, list[tuple[float, Attributes]]] = {
        "payment.db.pool.max": [],
        "payment.db.pool.waiting": [],
        "payment.db.pool.waits": [],
        "payment.db.pool.wait": [],
        "payment.db.pool.errors": [],
    }
    for name, pool in stats.items():
        label = {"pool": name}
        size, idle = pool.get("pool_size", 0), pool.get("pool_available", 0)
        used += [(size - idle, {**label, "state": "used"}), (idle, {**label, "state": "idle"})]
        gauges["payment.db.pool.max"].append((pool.get("pool_max", 0), label))
        gauges["payment.db.pool.waiting"].append((pool.get("requests_waiting", 0), label))
        gauges["payment.db.pool.waits"].append((pool.get("requests_queued", 0), label))
        gauges["payment.db.pool.wait"].append((pool.get("requests_wait_ms", 0) / 1000.0, label))
        gauges["payment.db.pool.errors"].append((pool.get("requests_errors", 0), label))
    metrics.observe("payment.db.pool.connections", used)
    for series, values in gauges.items():
        metrics.observe(series, values)


def package_version() -> str:
    """The installed version of payment-service ("unknown" when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("payment-service")
    except PackageNotFoundError:
        return "unknown"


# -- Prometheus text format ---------------------------------------------------------------

_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")
_UNIT_SUFFIXES: Final = {
    "s": "seconds",
    "ms": "milliseconds",
    "By": "bytes",
    "1": "ratio",
}


def prometheus_name(name: str, unit: str, kind: Kind) -> str:
    """The Prometheus name of an OpenTelemetry instrument (the compatibility spec's rules)."""
    base = _INVALID_NAME_CHARS.sub("_", name).strip("_")
    base = re.sub(r"__+", "_", base)
    if unit and not unit.startswith("{"):
        suffix = _UNIT_SUFFIXES.get(unit, _INVALID_LABEL_CHARS.sub("", unit))
        if suffix == "ratio" and kind != "gauge":
            suffix = ""
        if suffix and not base.endswith("_" + suffix):
            base = f"{base}_{suffix}"
    if kind == "counter" and not base.endswith("_total"):
        base += "_total"
    return base


def _family_name(declared: _Declared) -> str:
    # The `_total` suffix belongs to samples; HELP and TYPE of a counter family carry it
    # too in the 0.0.4 text format, which is what Prometheus and most parsers expect.
    return prometheus_name(declared.name, declared.unit, declared.kind)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(attributes: Mapping[str, object], extra: Sequence[tuple[str, str]] = ()) -> str:
    pairs = [
        (_INVALID_LABEL_CHARS.sub("_", str(key)), str(value))
        for key, value in sorted(attributes.items())
    ]
    pairs += list(extra)
    if not pairs:
        return ""
    return "{" + ",".join(f'{key}="{_escape_label(value)}"' for key, value in pairs) + "}"


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def render_prometheus(metrics: Iterable[Metric], declared: Iterable[_Declared] = ()) -> str:
    """Prometheus text of OpenTelemetry metric data.

    Every `declared` instrument gets its HELP and TYPE lines even before it has a sample,
    so a scrape lists every series the service can produce.
    """
    by_name: dict[str, Metric] = {m.name: m for m in metrics}
    families: dict[str, tuple[str, str, Metric | None]] = {}
    for item in declared:
        families[_family_name(item)] = (item.kind, item.help, by_name.pop(item.name, None))
    for other in by_name.values():  # instruments not declared here (another library's)
        other_kind = _kind_of(other)
        if other_kind is not None:
            name = prometheus_name(other.name, other.unit or "", other_kind)
            families[name] = (other_kind, other.description or other.name, other)
    out: list[str] = []
    for name, (kind, help_text, metric) in sorted(families.items()):
        out.append(f"# HELP {name} {_escape_help(help_text)}")
        out.append(f"# TYPE {name} {kind}")
        if metric is not None:
            out.extend(_samples(name, metric))
    return "\n".join(out) + "\n"


def _kind_of(metric: Metric) -> Kind | None:
    data = metric.data
    if isinstance(data, Sum):
        return "counter" if data.is_monotonic else "gauge"
    if isinstance(data, Gauge):
        return "gauge"
    if isinstance(data, HistogramData):
        return "histogram"
    return None  # exponential histograms are not used here


def _samples(name: str, metric: Metric) -> list[str]:
    data = metric.data
    lines: list[str] = []
    if isinstance(data, Sum | Gauge):
        for point in sorted(data.data_points, key=_point_key):
            assert isinstance(point, NumberDataPoint)
            lines.append(f"{name}{_labels(point.attributes or {})} {_number(point.value)}")
    elif isinstance(data, HistogramData):
        for hpoint in sorted(data.data_points, key=_point_key):
            assert isinstance(hpoint, HistogramDataPoint)
            attributes = hpoint.attributes or {}
            cumulative = 0
            bounds = [*hpoint.explicit_bounds, math.inf]
            for bound, count in zip(bounds, hpoint.bucket_counts, strict=False):
                cumulative += count
                le = "+Inf" if math.isinf(bound) else _number(float(bound))
                lines.append(f"{name}_bucket{_labels(attributes, [('le', le)])} {cumulative}")
            lines.append(f"{name}_sum{_labels(attributes)} {_number(hpoint.sum)}")
            lines.append(f"{name}_count{_labels(attributes)} {hpoint.count}")
    return lines


def _point_key(point: NumberDataPoint | HistogramDataPoint) -> str:
    return repr(sorted((point.attributes or {}).items()))
