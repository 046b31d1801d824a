"""The series observed at scrape time: gauges and counters whose values collectors report.

Gauges that describe shared state (the outbox backlog, payments in flight, consumer lag)
and counters kept by other components (the relay, the reconciler, the pools) are
observable instruments. Their values come from async collectors run at scrape time
(`Metrics.add_collector`, `Metrics.observe`), which may query PostgreSQL or the broker.
The instruments updated as things happen are attributes of `Metrics` (metrics.py).
"""

from __future__ import annotations

from typing import Final

from payment.adapters.observability.prometheus import Declared

OBSERVED: Final[tuple[Declared, ...]] = (
    Declared(
        "payment.outbox.backlog", "{row}", "gauge",
        "outbox rows not yet published",
    ),
    Declared(
        "payment.outbox.oldest_age", "s", "gauge",
        "age of the oldest unpublished outbox row (0 when none)",
    ),
    Declared(
        "payment.in_flight", "{payment}", "gauge",
        "payments initiated and not yet terminal (not counting those flagged for review)",
        alias="payment.payments.in_flight",
    ),
    Declared(
        "payment.in_flight.oldest_age", "s", "gauge",
        "age of the oldest in-flight payment not flagged for review (0 when none)",
        alias="payment.payments.in_flight.oldest_age",
    ),
    Declared(
        "payment.review_pending", "{payment}", "gauge",
        "unresolved payments flagged for manual review",
        alias="payment.payments.review_pending",
    ),
    Declared(
        "payment.consumer.lag", "{message}", "gauge",
        "per assigned partition: broker highwater minus the consumer's position",
    ),
    Declared(
        "payment.processor.in_flight", "{call}", "gauge",
        "gateway calls in flight now (at most PAYMENT_PROCESSOR_MAX_CONCURRENCY)",
    ),
    Declared(
        "payment.processor.in_flight_max", "{call}", "gauge",
        "the most gateway calls this instance had in flight at once since it started",
    ),
    Declared(
        "payment.processor.waiting", "{call}", "gauge",
        "gateway calls waiting for a slot under the bulkhead",
    ),
    Declared(
        "payment.processor.rate_limit", "{call}", "gauge",
        "gateway calls per second allowed now: PAYMENT_PROCESSOR_MAX_RATE, less after a 429",
    ),
    Declared(
        "payment.processor.throttled", "{call}", "counter",
        "gateway answers 429 (rate limited): the call was sent again after Retry-After",
    ),
    Declared(
        "payment.reconciler.actions", "{action}", "counter",
        "reconciler results per in-flight payment it looked at, and failed rounds",
    ),
    Declared(
        "payment.refund_worker.actions", "{action}", "counter",
        "refund worker results per pending refund it settled, and failed rounds",
    ),
    Declared(
        "payment.outbox.published", "{row}", "counter",
        "outbox rows published by this instance",
    ),
    Declared(
        "payment.outbox.send_failures", "{row}", "counter",
        "outbox sends the broker did not acknowledge (retried)",
    ),
    Declared(
        "payment.build.info", "", "gauge",
        "always 1: the running version and the processor in use (a label each)",
    ),
    Declared(
        "process.cpu", "s", "counter",
        "CPU time of this process, user and system",
    ),
    Declared(
        "process.resident_memory", "By", "gauge",
        "resident memory of this process",
    ),
    Declared(
        "process.open_fds", "{fd}", "gauge",
        "file descriptors this process has open",
    ),
    Declared(
        "process.max_fds", "{fd}", "gauge",
        "the process's limit of open file descriptors",
    ),
    Declared(
        "process.start_time", "s", "gauge",
        "when the process started (seconds since the epoch)",
    ),
    Declared(
        "payment.db.pool.connections", "{connection}", "gauge",
        "connections of a database pool (main: handlers; control: relay, health, metrics,"
        " retention), by state: used or idle",
    ),
    Declared(
        "payment.db.pool.max", "{connection}", "gauge",
        "the most connections a pool may open",
    ),
    Declared(
        "payment.db.pool.waiting", "{request}", "gauge",
        "requests waiting for a connection of the pool now",
    ),
    Declared(
        "payment.db.pool.waits", "{request}", "counter",
        "requests that had to wait for a connection (none was free)",
    ),
    Declared(
        "payment.db.pool.wait", "s", "counter",
        "time requests spent waiting for a connection",
    ),
    Declared(
        "payment.db.pool.errors", "{request}", "counter",
        "requests that got no connection (timed out waiting, or the pool failed)",
    ),
    Declared(
        "payment.outbox.relay_leader", "{instance}", "gauge",
        "1 while this instance's relay holds the leadership and publishes, else 0",
    ),
    Declared(
        "payment.retention.purged", "{row}", "counter",
        "rows purged by retention, by table: outbox (published rows) or inbox (marks)",
    ),
    Declared(
        "payment.retention.failed_rounds", "{round}", "counter",
        "retention rounds that failed (the database refused or was unreachable)",
    ),
)  # fmt: skip
