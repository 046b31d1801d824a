"""The service's metrics: OpenTelemetry instruments, read in process, rendered as Prometheus text.

Why the OpenTelemetry metrics SDK rather than a registry of our own: the instruments are
the standard API (anything else in the process, and a later OTLP metric export, sees the
same series), and the SDK does the aggregation, cardinality limits and histogram buckets.
`prometheus_client` writes the text format (prometheus.py); the series read at scrape
time are declared in metric_series.py.

Label values are bounded sets chosen by the code (results, reasons, topics, partitions),
never user input: no booking id, payment id or payment method is ever a label.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Final

from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Metric, MetricReader
from opentelemetry.sdk.resources import Resource

from payment.adapters.observability.metric_series import OBSERVED
from payment.adapters.observability.prometheus import Declared, render_prometheus

log = logging.getLogger(__name__)

Attributes = Mapping[str, str]
Collector = Callable[[], Awaitable[None]]

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
            # Exemplars are never exposed (the Prometheus text has none), and the SDK's
            # default would sample one for every measurement under a sampled span: about
            # a tenth of each histogram record, three per payment (issue 15).
            exemplar_filter=AlwaysOffExemplarFilter(),
        )
        meter = self._provider.get_meter(METER_NAME)
        self._declared: dict[str, Declared] = {}
        # Old instrument names (renamed, exposed under both for a release) -> new ones.
        self._renamed: dict[str, str] = {}
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
        self.intake_pauses = self._counter(
            meter, "payment.consumer.intake_pauses", "{pause}",
            "times request intake paused because the outbox backlog passed its high-water mark",
        )  # fmt: skip
        # -- payments --------------------------------------------------------------------
        self.payments_initiated = self._counter(
            meter, "payment.initiated", "{payment}", "payments initiated (committed)",
            alias="payment.payments.initiated",
        )  # fmt: skip
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
            meter, "payment.flagged", "{payment}",
            "payments flagged for manual review (outcome unknown past the review window)",
            alias="payment.payments.flagged",
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
        for declared in OBSERVED:
            self._observable(meter, declared)
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
            self.intake_pauses,
        ):
            counter.add(0)
        self.outcomes.add(0, {"outcome": "completed"})
        for reason in FAILURE_REASONS:
            self.outcomes.add(0, {"outcome": "failed", "reason": reason})

    # -- declaring -------------------------------------------------------------------------

    def _declare(self, declared: Declared) -> None:
        self._declared[declared.name] = declared
        if declared.alias is not None:
            self._renamed[declared.alias] = declared.name

    def _counter(
        self, meter: Meter, name: str, unit: str, help_text: str, *, alias: str | None = None
    ) -> Counter:
        self._declare(Declared(name, unit, "counter", help_text, alias))
        return meter.create_counter(name, unit=unit, description=help_text)

    def _histogram(
        self, meter: Meter, name: str, unit: str, help_text: str, buckets: Sequence[float]
    ) -> Histogram:
        self._declare(Declared(name, unit, "histogram", help_text))
        return meter.create_histogram(
            name, unit=unit, description=help_text, explicit_bucket_boundaries_advisory=buckets
        )

    def _observable(self, meter: Meter, declared: Declared) -> None:
        self._declare(declared)
        create = (
            meter.create_observable_counter
            if declared.kind == "counter"
            else meter.create_observable_gauge
        )
        create(
            declared.name,
            callbacks=[self._callback(declared.name)],
            unit=declared.unit,
            description=declared.help,
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
        """Set the current values of an observable instrument (a collector calls this).

        A renamed instrument's old name still works for a release.
        """
        name = self._renamed.get(name, name)
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
