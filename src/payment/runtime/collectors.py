"""The metrics read when /metrics is scraped: the database's backlog, the components'
tallies and the process's own figures, registered while the service runs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from payment.adapters.kafka.consumer import KafkaInboxConsumer
from payment.adapters.kafka.relay import KafkaOutboxRelay
from payment.adapters.observability.metrics import Metrics, observe_pools
from payment.adapters.observability.process_stats import process_stats
from payment.adapters.postgres.monitoring import read_stats
from payment.adapters.postgres.retention import RetentionJob
from payment.adapters.processors.limits import LimitedProcessor
from payment.application.reconciler import Reconciler
from payment.application.refund_worker import RefundWorker

_PROCESS_FIGURES = (
    ("process.cpu", "cpu_s"),
    ("process.resident_memory", "rss_bytes"),
    ("process.open_fds", "open_fds"),
    ("process.max_fds", "max_fds"),
    ("process.start_time", "start_time_s"),
)


@dataclass(frozen=True, slots=True)
class Collectors:
    """Reads the running components' figures into `metrics` at each scrape (each method
    is a `collector` label of payment_metrics_collector_failures_total, docs/operations.md)."""

    metrics: Metrics
    pools: dict[str, Any]
    processor: LimitedProcessor
    relay: KafkaOutboxRelay
    consumer: KafkaInboxConsumer
    reconciler: Reconciler
    refund_worker: RefundWorker
    retention: RetentionJob

    async def collect_database(self) -> None:
        m = self.metrics
        stats = await read_stats(self.pools["control"])
        m.observe("payment.outbox.backlog", [(stats.outbox_backlog, {})])
        m.observe("payment.outbox.oldest_age", [(stats.outbox_oldest_age_s, {})])
        m.observe("payment.payments.in_flight", [(stats.in_flight, {})])
        m.observe("payment.payments.in_flight.oldest_age", [(stats.in_flight_oldest_age_s, {})])
        m.observe("payment.payments.review_pending", [(stats.review_pending, {})])

    async def collect_process(self) -> None:
        m, processor, relay = self.metrics, self.processor, self.relay
        # The usual actions read 0 until they happen, so alerts have a series.
        for name, usual, actions in (
            (
                "payment.reconciler.actions",
                ("completed", "failed", "unknown", "flagged", "error"),
                self.reconciler.actions,
            ),
            (
                "payment.refund_worker.actions",
                ("refunded", "failed", "unknown", "error"),
                self.refund_worker.actions,
            ),
        ):
            counts = {**dict.fromkeys(usual, 0), **actions}
            m.observe(name, [(count, {"action": action}) for action, count in counts.items()])
        gateway_labels = {"processor": processor.name}
        for name, value in (
            ("payment.processor.in_flight", processor.in_flight),
            ("payment.processor.in_flight_max", processor.most_in_flight),
            ("payment.processor.waiting", processor.waiting),
            ("payment.processor.rate_limit", processor.rate.rate()),
            ("payment.processor.throttled", processor.throttles),
        ):
            m.observe(name, [(value, gateway_labels)])
        m.observe("payment.outbox.published", [(relay.published, {})])
        m.observe("payment.outbox.send_failures", [(relay.send_failures, {})])
        lags = await self.consumer.lag()
        m.observe(
            "payment.consumer.lag",
            [
                (lag, {"topic": tp.topic, "partition": str(tp.partition)})
                for tp, lag in lags.items()
            ],
        )

    async def collect_instance(self) -> None:
        m, retention = self.metrics, self.retention
        stats = process_stats()
        for name, key in _PROCESS_FIGURES:
            if key in stats:
                m.observe(name, [(stats[key], {})])
        observe_pools(m, {name: pool.get_stats() for name, pool in self.pools.items()})
        m.observe("payment.outbox.relay_leader", [(int(self.relay.leading), {})])
        m.observe(
            "payment.retention.purged",
            [
                (retention.purged_outbox, {"table": "outbox"}),
                (retention.purged_inbox, {"table": "inbox"}),
            ],
        )
        m.observe("payment.retention.failed_rounds", [(retention.failed_rounds, {})])


async def registered_collectors(metrics: Metrics, collectors: Collectors) -> AsyncIterator[None]:
    """A resource: the collectors read at each scrape while the service runs."""
    registered = (
        collectors.collect_instance,
        collectors.collect_process,
        collectors.collect_database,
    )
    for collect in registered:
        metrics.add_collector(collect)
    try:
        yield
    finally:
        for collect in reversed(registered):
            metrics.remove_collector(collect)
