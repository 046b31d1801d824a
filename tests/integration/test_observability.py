"""Observability through the composed service: one trace per payment, /metrics, readiness.

The real `Service` (payment.bootstrap) runs in process against this test's PostgreSQL
database and the session's broker; its tracer provider is overridden with one that keeps
finished spans in memory, its processor with a fake that can be told to lose answers.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from dependency_injector import providers
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from payment.adapters.kafka.producer import create_producer
from payment.adapters.processors.fake import FakeProcessor
from payment.bootstrap import Service, make_container
from payment.domain.processor import ChargeOutcome, ChargeRequest, OutcomeUnknown
from payment.settings import Settings
from support.broker import client_fetch_max_wait_ms, idempotent_producer
from support.service_settings import isolated_settings

pytestmark = pytest.mark.timeout(120)

TOKEN = "pm_card_visa_obs_secret_token"


class ForgetfulProcessor:
    """The fake gateway, except that it loses answers for some bookings.

    `lost-…`: the first charge's answer is lost (OutcomeUnknown, nothing charged), so the
    reconciler resolves the payment. `stuck-…`: every answer is lost, for ever.
    """

    name = "fake"

    def __init__(self) -> None:
        self.fake = FakeProcessor()
        self.lost: set[uuid.UUID] = set()

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        if request.booking_id.startswith("stuck-"):
            raise OutcomeUnknown("the gateway did not answer")
        if request.booking_id.startswith("lost-") and request.payment_id not in self.lost:
            self.lost.add(request.payment_id)
            raise OutcomeUnknown("the gateway did not answer")
        return await self.fake.charge(request)

    async def lookup(self, request: ChargeRequest) -> ChargeOutcome | None:
        if request.booking_id.startswith("stuck-"):
            return None
        return await self.fake.lookup(request)


@dataclass
class Running:
    service: Service
    settings: Settings
    spans: InMemorySpanExporter
    received: list[ConsumerRecord[bytes, bytes]] = field(default_factory=list)
    producer: AIOKafkaProducer | None = None

    @property
    def port(self) -> int:
        assert self.service.http is not None
        return self.service.http.port

    async def get(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}") as client:
            return await client.get(path, timeout=10)

    async def send(
        self,
        data: dict[str, Any] | bytes,
        *,
        key: str,
        ce_id: str | None = None,
        traceparent: str | None = None,
    ) -> str:
        assert self.producer is not None
        ce_id = ce_id or str(uuid.uuid4())
        headers = [
            ("ce_specversion", b"1.0"),
            ("ce_id", ce_id.encode()),
            ("ce_source", b"saga-orchestrator-test"),
            ("ce_type", b"saga.request_payment"),
            ("ce_time", datetime.now(UTC).isoformat().replace("+00:00", "Z").encode()),
            ("content-type", b"application/json"),
        ]
        if traceparent is not None:
            headers.append(("traceparent", traceparent.encode()))
        value = data if isinstance(data, bytes) else json.dumps(data).encode()
        await self.producer.send_and_wait(
            self.settings.topic_request, value=value, key=key.encode(), headers=headers
        )
        return ce_id

    async def wait_for(self, found: Callable[[], Any], what: str, within: float = 30.0) -> Any:
        async with asyncio.timeout(within):
            while True:
                value = found()
                if value:
                    return value
                await asyncio.sleep(0.05)
        raise AssertionError(what)  # pragma: no cover (the timeout raises first)

    def events(self, booking: str, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
        return [
            r
            for r in self.received
            if r.topic == topic and json.loads(r.value or b"{}").get("booking_id") == booking
        ]

    async def outcome(self, booking: str) -> ConsumerRecord[bytes, bytes]:
        s = self.settings

        def terminal() -> list[ConsumerRecord[bytes, bytes]]:
            return self.events(booking, s.topic_completed) + self.events(booking, s.topic_failed)

        found: list[ConsumerRecord[bytes, bytes]] = await self.wait_for(
            terminal, f"no outcome for {booking}"
        )
        return found[0]


def header(record: ConsumerRecord[bytes, bytes], name: str) -> str | None:
    values = [v for k, v in record.headers if k == name]
    return None if not values or values[0] is None else values[0].decode()


def new_traceparent() -> tuple[str, str]:
    trace_id = uuid.uuid4().hex
    return f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01", trace_id


RunService = Callable[..., Awaitable[Running]]


@pytest_asyncio.fixture
async def run_service(database_url: str, kafka_bootstrap: str) -> AsyncIterator[RunService]:
    started: list[tuple[Running, asyncio.Task[None], list[asyncio.Task[None]]]] = []
    clients: list[Any] = []

    async def start(**overrides: Any) -> Running:
        prefix = f"obs{uuid.uuid4().hex[:10]}"
        settings = isolated_settings(
            prefix,
            database_url=database_url,
            bootstrap=kafka_bootstrap,
            kafka_enable_idempotence=idempotent_producer(),
            kafka_topic_partitions=2,
            **overrides,
        )
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        container = make_container(settings)
        container.tracer_provider.override(providers.Object(provider))
        container.processor.override(providers.Object(ForgetfulProcessor()))
        service = Service(settings, container)
        task = asyncio.create_task(service.run())
        running = Running(service, settings, exporter)
        async with asyncio.timeout(30):
            while not service.started.is_set():
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
        producer = create_producer(kafka_bootstrap, enable_idempotence=idempotent_producer())
        await producer.start()
        clients.append(producer)
        running.producer = producer
        listener = AIOKafkaConsumer(
            settings.topic_initiated,
            settings.topic_completed,
            settings.topic_failed,
            settings.topic_dead_letter,
            bootstrap_servers=kafka_bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_wait_ms=client_fetch_max_wait_ms(),
        )
        await listener.start()
        clients.append(listener)

        async def listen() -> None:
            while True:
                for batch in (await listener.getmany(timeout_ms=100)).values():
                    running.received.extend(batch)

        started.append((running, task, [asyncio.create_task(listen())]))
        return running

    try:
        yield start
    finally:
        for running, task, helpers in started:
            for helper in helpers:
                helper.cancel()
            running.service.stop()
            await asyncio.wait_for(task, 60)
        for client in clients:
            await client.stop()


def trace_spans(running: Running, trace_id: str) -> list[ReadableSpan]:
    return [
        s
        for s in running.spans.get_finished_spans()
        if s.context is not None and f"{s.context.trace_id:032x}" == trace_id
    ]


def span_names(spans: list[ReadableSpan]) -> list[str]:
    return sorted(s.name for s in spans)


def assert_no_secret_in(spans: list[ReadableSpan], *secrets: str) -> None:
    for span in spans:
        text = repr(dict(span.attributes or {})) + repr([e.attributes for e in span.events])
        text += span.name + (span.status.description or "")
        for secret in secrets:
            assert secret not in text, (span.name, text)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value of every sample line of a Prometheus text exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match is not None, f"not Prometheus text: {line!r}"
        out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


def value(text: str, series: str) -> float:
    return samples(text).get(series, 0.0)


def request(booking: str, **fields: Any) -> dict[str, Any]:
    return {
        "booking_id": booking,
        "amount": 4_200,
        "currency": "EUR",
        "payment_method": TOKEN,
        "saga_id": f"saga-{booking}",
        **fields,
    }


# -- tracing -------------------------------------------------------------------------------


async def test_one_trace_from_request_to_outcome(run_service: RunService) -> None:
    running = await run_service()
    s = running.settings
    traceparent, trace_id = new_traceparent()
    booking = f"trace-{uuid.uuid4().hex[:8]}"
    await running.send(request(booking), key=booking, traceparent=traceparent)
    completed = await running.outcome(booking)
    [initiated] = running.events(booking, s.topic_initiated)

    # The outbound events carry the request's trace id.
    assert completed.topic == s.topic_completed
    for record in (initiated, completed):
        tp = header(record, "traceparent")
        assert tp is not None and tp.split("-")[1] == trace_id, tp

    # Every span of the payment is in that trace: both consumptions, the transactions,
    # the gateway call and both publishes.
    def complete() -> list[ReadableSpan]:
        spans = trace_spans(running, trace_id)
        names = span_names(spans)
        return spans if f"send {s.topic_completed}" in names else []

    spans: list[ReadableSpan] = await running.wait_for(complete, "the trace is incomplete")
    names = span_names(spans)
    assert names.count(f"process {s.topic_request}") == 1, names
    assert names.count(f"process {s.topic_initiated}") == 1, names
    assert names.count(f"send {s.topic_initiated}") == 1, names
    assert names.count(f"send {s.topic_completed}") == 1, names
    assert names.count("fake charge") == 1, names
    # Three transactions for the execution: it reads the payment, writes ChargeStarted
    # ahead of the call, calls the gateway with no transaction open, then records the
    # outcome.
    assert names.count("db transaction") == 4, names
    assert len(spans) == 9, names

    by_name = {sp.name: sp for sp in spans}
    request_span = by_name[f"process {s.topic_request}"]
    # It continues the sender's span...
    assert request_span.parent is not None
    assert f"{request_span.parent.span_id:016x}" == traceparent.split("-")[2]
    # ...and the self-consumption of payment.initiated continues the span that wrote it.
    execute_span = by_name[f"process {s.topic_initiated}"]
    initiated_parent = (header(initiated, "traceparent") or "").split("-")[2]
    assert execute_span.parent is not None
    assert f"{execute_span.parent.span_id:016x}" == initiated_parent

    # The relay's publish continues the trace stored with the row: the writing transaction.
    publish_span = by_name[f"send {s.topic_initiated}"]
    assert publish_span.parent is not None
    assert f"{publish_span.parent.span_id:016x}" == initiated_parent
    # Named as OpenTelemetry's messaging conventions spell it.
    assert publish_span.attributes is not None
    assert publish_span.attributes["messaging.system"] == "kafka"
    assert publish_span.attributes["messaging.operation.name"] == "send"
    assert publish_span.attributes["messaging.operation.type"] == "send"
    assert publish_span.attributes["messaging.destination.name"] == s.topic_initiated

    payment_id = json.loads(completed.value or b"{}")["payment_id"]
    charge = by_name["fake charge"]
    assert charge.attributes is not None
    assert charge.attributes["payment.id"] == payment_id
    assert charge.attributes["payment.booking_id"] == booking
    assert charge.attributes["payment.processor"] == "fake"
    assert charge.attributes["payment.outcome"] == "approved"
    assert by_name[f"send {s.topic_completed}"].attributes is not None
    assert by_name[f"send {s.topic_completed}"].attributes["payment.id"] == payment_id
    assert request_span.attributes is not None
    assert request_span.attributes["cloudevents.event_type"] == "saga.request_payment"
    assert request_span.attributes["messaging.operation.name"] == "process"
    assert request_span.attributes["messaging.operation.type"] == "process"
    assert request_span.attributes["messaging.destination.name"] == s.topic_request
    assert request_span.attributes["payment.booking_id"] == booking
    assert_no_secret_in(running.spans.get_finished_spans(), TOKEN)


async def test_a_reconciled_payment_stays_in_the_trace_of_its_request(
    run_service: RunService,
) -> None:
    # Long enough for the consumer's own charge to come first on a loaded machine.
    running = await run_service(reconcile_after_s=3.0, reconcile_interval_s=0.2)
    traceparent, trace_id = new_traceparent()
    booking = f"lost-{uuid.uuid4().hex[:8]}"
    await running.send(request(booking), key=booking, traceparent=traceparent)
    completed = await running.outcome(booking)
    tp = header(completed, "traceparent")
    assert tp is not None and tp.split("-")[1] == trace_id

    def reconciled() -> list[ReadableSpan]:
        spans = trace_spans(running, trace_id)
        names = span_names(spans)
        published = f"send {running.settings.topic_completed}" in names
        return spans if published and "reconcile payment" in names else []

    spans: list[ReadableSpan] = await running.wait_for(reconciled, "no reconcile span")
    names = span_names(spans)
    assert "reconcile payment" in names, names
    # The lost answer, then the reconciler's lookup (nothing) and its charge.
    assert names.count("fake charge") == 2, names
    assert names.count("fake lookup") == 1, names
    metrics = (await running.get("/metrics")).text
    assert value(metrics, 'payment_reconciler_actions_total{action="completed"}') == 1
    assert value(metrics, 'payment_processor_errors_total{kind="unknown",operation="charge",'
                          'processor="fake"}') == 1  # fmt: skip


# -- metrics -------------------------------------------------------------------------------

LISTED_SERIES = (
    "payment_requests_received_total",
    "payment_requests_deduplicated_total",
    "payment_requests_invalid_total",
    "payment_messages_dead_lettered_total",
    "payment_outcomes_total",
    "payment_processor_call_duration_seconds",
    "payment_processor_errors_total",
    "payment_time_to_outcome_seconds",
    "payment_outbox_backlog",
    "payment_outbox_oldest_age_seconds",
    "payment_consumer_lag",
    "payment_in_flight",
    "payment_in_flight_oldest_age_seconds",
    "payment_reconciler_actions_total",
    "payment_refund_worker_actions_total",
    "payment_review_pending",
    "payment_flagged_total",
    "payment_initiated_total",
)
# The names before the stutter was removed, still listed for one release (CHANGELOG.md).
DEPRECATED_ALIASES = {
    "payment_payments_in_flight": "payment_in_flight",
    "payment_payments_in_flight_oldest_age_seconds": "payment_in_flight_oldest_age_seconds",
    "payment_payments_review_pending": "payment_review_pending",
    "payment_payments_flagged_total": "payment_flagged_total",
    "payment_payments_initiated_total": "payment_initiated_total",
}


async def test_metrics_list_every_series_and_move_with_traffic(run_service: RunService) -> None:
    running = await run_service(reconcile_after_s=2.0, reconcile_interval_s=0.2, review_after_s=3.0)
    s = running.settings
    before_response = await running.get("/metrics")
    assert before_response.status_code == 200
    assert before_response.headers["content-type"].startswith("text/plain; version=0.0.4")
    before = before_response.text
    for name in LISTED_SERIES:
        assert f"# TYPE {name} " in before, name
    assert value(before, "payment_requests_received_total") == 0

    ok = f"ok-{uuid.uuid4().hex[:8]}"
    ce_id = await running.send(request(ok), key=ok)
    await running.outcome(ok)
    await running.send(request(ok), key=ok, ce_id=ce_id)  # a redelivery
    invalid = f"bad-{uuid.uuid4().hex[:8]}"
    await running.send(request(invalid, amount=0), key=invalid)
    await running.outcome(invalid)
    await running.send(b"{not json", key="poison")
    stuck = f"stuck-{uuid.uuid4().hex[:8]}"
    await running.send(request(stuck), key=stuck)

    async def scrape() -> str:
        return (await running.get("/metrics")).text

    async with asyncio.timeout(30):
        while True:
            after = await scrape()
            dead = (
                f'payment_messages_dead_lettered_total{{cause="poison",topic="{s.topic_request}"}}'
            )
            if (
                value(after, "payment_requests_deduplicated_total") == 1
                and value(after, "payment_review_pending") == 1
                and value(after, dead) == 1
                and value(after, 'payment_reconciler_actions_total{action="flagged"}') == 1
            ):
                break
            await asyncio.sleep(0.2)

    assert value(after, "payment_requests_received_total") == 5  # the poison one too
    assert value(after, "payment_requests_invalid_total") == 1
    assert value(after, 'payment_outcomes_total{outcome="completed"}') == 1
    assert value(after, 'payment_outcomes_total{outcome="failed",reason="invalid_request"}') == 1
    assert value(after, 'payment_requests_handled_total{result="accepted"}') == 2
    assert value(after, "payment_initiated_total") == 2
    assert value(after, "payment_flagged_total") == 1
    assert value(after, 'payment_reconciler_actions_total{action="flagged"}') == 1
    assert value(after, "payment_in_flight") == 0  # the stuck one is flagged
    for old, new in DEPRECATED_ALIASES.items():
        assert f"# TYPE {old} " in after, old
        assert value(after, old) == value(after, new), old
    charge = 'operation="charge",processor="fake"'
    calls = "payment_processor_call_duration_seconds_count"
    assert value(after, f'{calls}{{{charge},result="approved"}}') == 1
    assert value(after, f'payment_processor_errors_total{{kind="unknown",{charge}}}') >= 2
    assert value(after, 'payment_time_to_outcome_seconds_count{outcome="completed"}') == 1
    assert value(after, "payment_outbox_published_total") >= 3
    lag = [k for k in samples(after) if k.startswith("payment_consumer_lag{")]
    assert lag, after
    assert all('partition="' in k and 'topic="' in k for k in lag)

    async with asyncio.timeout(15):
        while True:
            if value(await scrape(), "payment_outbox_backlog") == 0:
                break
            await asyncio.sleep(0.1)
    assert TOKEN not in after


# -- readiness -----------------------------------------------------------------------------


async def test_readiness_turns_503_when_an_in_flight_payment_is_too_old(
    run_service: RunService,
) -> None:
    running = await run_service(ready_max_in_flight_age_s=0.5, reconcile_after_s=3600)
    ready = await running.get("/health/ready")
    assert ready.status_code == 200, ready.text
    assert "in_flight: ok" in ready.text and "outbox: ok" in ready.text

    stuck = f"stuck-{uuid.uuid4().hex[:8]}"
    await running.send(request(stuck), key=stuck)

    async def unready() -> httpx.Response | None:
        response = await running.get("/health/ready")
        return response if response.status_code == 503 else None

    async with asyncio.timeout(20):
        while True:
            response = await unready()
            if response is not None:
                break
            await asyncio.sleep(0.2)
    assert "in_flight: oldest in-flight payment is" in response.text, response.text
    assert "database: ok" in response.text and "broker: ok" in response.text
