"""Tracing set-up from OTEL_* and the instrumented adapters, on the in-memory stack."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Tracer

from payment.adapters.memory import MemoryUnitOfWorkFactory
from payment.adapters.observability.instrumented import (
    InstrumentedProcessor,
    InstrumentedUnitOfWorkFactory,
    reconcile_scope,
)
from payment.adapters.observability.metrics import Metrics
from payment.adapters.observability.telemetry import (
    W3C,
    PropagatingTracerProvider,
    configure_tracing,
    context_from_trace,
    current_trace_headers,
    records_spans,
    span_exporters,
    start_span_continuing,
    trace_headers_of,
    trace_headers_of_record,
)
from payment.adapters.processors.fake import FakeProcessor
from payment.application.commands import (
    ExecutePayment,
    InboundRef,
    RequestPayment,
    TraceHeaders,
)
from payment.application.handlers import (
    ExecuteResult,
    ExecutionPolicy,
    RequestResult,
    execute_payment,
    request_payment,
)
from payment.application.reconciler import Reconciler
from payment.domain.money import Money
from payment.domain.processor import ChargeOutcome, ChargeRequest, OutcomeUnknown

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
TOKEN = "pm_secret_gateway_token_1234"
OTLP_INSTALLED = (
    importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http.trace_exporter") is not None
    if importlib.util.find_spec("opentelemetry.exporter") is not None
    else False
)


class Clock:
    def __init__(self) -> None:
        self.at = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.at


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(exporter: InMemorySpanExporter) -> Tracer:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test")


def trace_id_of(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


# -- configuration ---------------------------------------------------------------------------


def test_nothing_is_exported_by_default() -> None:
    assert span_exporters({}) == []


def test_console_on_request() -> None:
    [exporter] = span_exporters({"OTEL_TRACES_EXPORTER": "console"})
    assert isinstance(exporter, ConsoleSpanExporter)
    assert span_exporters({"OTEL_TRACES_EXPORTER": "none"}) == []


def test_otlp_without_its_package_warns_once_and_runs_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whether or not the extra is installed here: its module cannot be imported.
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with caplog.at_level(logging.WARNING, logger="payment.adapters.observability.telemetry"):
        exporters = span_exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert exporters == []
    [warning] = caplog.records
    assert "opentelemetry-exporter-otlp-proto-http" in warning.getMessage()
    assert "payment-service[otlp]" in warning.getMessage()


@pytest.mark.skipif(not OTLP_INSTALLED, reason="the otlp extra is not installed")
def test_otlp_when_an_endpoint_is_set_exports_spans_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from support.otlp_receiver import otlp_receiver  # needs the otlp extra

    with otlp_receiver() as collector:
        environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint}
        for name, value in environ.items():  # the exporter reads OTEL_* itself
            monkeypatch.setenv(name, value)
        [exporter] = span_exporters(environ)
        assert type(exporter).__name__ == "OTLPSpanExporter"
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        with provider.get_tracer("test").start_as_current_span(
            "process saga.request_payment",
            kind=SpanKind.CONSUMER,
            attributes={"messaging.system": "kafka", "messaging.kafka.offset": 7},
        ):
            pass
        provider.shutdown()

    [span] = collector.spans
    assert collector.paths == ["/v1/traces"]
    assert span.name == "process saga.request_payment"
    assert span.attributes == {"messaging.system": "kafka", "messaging.kafka.offset": 7}


def test_the_sdk_can_be_disabled() -> None:
    assert configure_tracing({"OTEL_SDK_DISABLED": "true"}) is None
    provider = configure_tracing(
        {"OTEL_SERVICE_NAME": "payments-eu", "OTEL_TRACES_EXPORTER": "console"}
    )
    assert isinstance(provider, TracerProvider)
    assert provider.resource.attributes["service.name"] == "payments-eu"
    provider.shutdown()


def test_without_an_exporter_spans_record_nothing_and_carry_the_trace_on() -> None:
    provider = configure_tracing({"OTEL_TRACES_EXPORTER": "none"})
    assert isinstance(provider, PropagatingTracerProvider)
    assert isinstance(configure_tracing({}), PropagatingTracerProvider)
    tracer = provider.get_tracer("payment")
    inbound = context_from_trace(TraceHeaders(traceparent=TRACEPARENT, tracestate="vendor=1"))
    with tracer.start_as_current_span("process", context=inbound) as span:
        assert not span.is_recording()
        own = span.get_span_context()
        assert f"{own.trace_id:032x}" == TRACE_ID
        assert f"{own.span_id:016x}" != "00f067aa0ba902b7"  # a span id of its own
        headers = current_trace_headers()
        assert headers is not None and headers.traceparent is not None
        assert headers.traceparent.split("-")[1] == TRACE_ID
        assert headers.traceparent.endswith("-01")  # the parent's sampled flag, kept
        assert headers.tracestate == "vendor=1"
        # A child of the current span stays in the trace, with its own id again.
        child = tracer.start_span("publish").get_span_context()
        assert child.trace_id == own.trace_id and child.span_id != own.span_id
    unsampled = context_from_trace(TraceHeaders(traceparent=TRACEPARENT[:-2] + "00"))
    assert not tracer.start_span("x", context=unsampled).get_span_context().trace_flags.sampled
    # Without a parent: a new trace, sampled like the SDK's default sampler decides.
    roots = [tracer.start_span("x", context=context_from_trace(None)) for _ in range(2)]
    first, second = (r.get_span_context() for r in roots)
    assert first.is_valid and first.trace_flags.sampled
    assert first.trace_id != second.trace_id


def test_only_the_tracers_that_never_record_are_said_not_to() -> None:
    assert not records_spans(PropagatingTracerProvider().get_tracer("payment"))
    assert not records_spans(trace.NoOpTracer())
    assert records_spans(TracerProvider().get_tracer("payment"))
    # The API's proxy may become a recording tracer once a provider is set.
    assert records_spans(trace.get_tracer("payment"))


# -- W3C helpers ---------------------------------------------------------------------------


def test_a_span_continues_a_valid_traceparent_and_starts_a_trace_otherwise(tracer: Tracer) -> None:
    with tracer.start_as_current_span(
        "x", context=context_from_trace(TraceHeaders(traceparent=TRACEPARENT))
    ) as span:
        assert f"{span.get_span_context().trace_id:032x}" == TRACE_ID
        headers = current_trace_headers()
        assert headers is not None and headers.traceparent is not None
        assert headers.traceparent.split("-")[1] == TRACE_ID
    for invalid in (None, "garbage", f"00-{'0' * 32}-00f067aa0ba902b7-01"):
        with tracer.start_as_current_span(
            "y", context=context_from_trace(TraceHeaders(traceparent=invalid))
        ) as span:
            assert f"{span.get_span_context().trace_id:032x}" != TRACE_ID
    assert current_trace_headers() is None


SENT_HEADERS = [
    TraceHeaders(traceparent=TRACEPARENT),
    TraceHeaders(traceparent=TRACEPARENT[:-2] + "00"),  # not sampled
    TraceHeaders(traceparent=TRACEPARENT, tracestate="vendor=1,other=x"),
]


@pytest.mark.parametrize("sent", SENT_HEADERS)
def test_a_continuing_span_without_an_exporter_is_what_the_tracer_would_start(
    sent: TraceHeaders,
) -> None:
    tracer = PropagatingTracerProvider().get_tracer("payment")
    fast = start_span_continuing(tracer, "process", sent, kind=SpanKind.CONSUMER)
    slow = tracer.start_span("process", context=context_from_trace(sent))
    made, expected = fast.get_span_context(), slow.get_span_context()
    assert not fast.is_recording()
    assert (made.trace_id, made.trace_flags, made.trace_state, made.is_remote) == (
        expected.trace_id,
        expected.trace_flags,
        expected.trace_state,
        expected.is_remote,
    )
    assert f"{made.trace_id:032x}" == TRACE_ID
    assert made.span_id not in (0, 0x00F067AA0BA902B7, expected.span_id)  # its own


@pytest.mark.parametrize(
    "sent",
    [
        None,
        TraceHeaders(),
        TraceHeaders(traceparent="garbage"),
        TraceHeaders(traceparent=f"00-{'0' * 32}-00f067aa0ba902b7-01"),
    ],
)
def test_a_continuing_span_without_a_valid_parent_starts_a_sampled_trace(
    sent: TraceHeaders | None,
) -> None:
    tracer = PropagatingTracerProvider().get_tracer("payment")
    made = start_span_continuing(tracer, "process", sent, kind=SpanKind.CONSUMER)
    other = start_span_continuing(tracer, "process", sent, kind=SpanKind.CONSUMER)
    context = made.get_span_context()
    assert context.is_valid and context.trace_flags.sampled
    assert context.trace_id != other.get_span_context().trace_id


def test_a_continuing_span_of_a_recording_tracer_is_its_child_and_records(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    span = start_span_continuing(tracer, "process", SENT_HEADERS[2], kind=SpanKind.CONSUMER)
    assert span.is_recording()
    span.end()
    (finished,) = exporter.get_finished_spans()
    assert finished.kind is SpanKind.CONSUMER and trace_id_of(finished) == TRACE_ID
    assert finished.parent is not None and finished.parent.span_id == 0x00F067AA0BA902B7
    assert finished.context is not None
    assert finished.context.trace_state.to_header() == "vendor=1,other=x"


def test_with_tracing_off_a_continuing_span_is_the_senders_context() -> None:
    off = start_span_continuing(
        trace.NoOpTracer(), "process", SENT_HEADERS[0], kind=SpanKind.CONSUMER
    )
    assert not off.is_recording()
    assert trace_headers_of(off) == SENT_HEADERS[0]  # no span id of its own


@pytest.mark.parametrize("sent", SENT_HEADERS)
def test_a_spans_headers_are_what_the_w3c_propagator_writes(sent: TraceHeaders) -> None:
    tracer = PropagatingTracerProvider().get_tracer("payment")
    span = tracer.start_span("process", context=context_from_trace(sent))
    carrier: dict[str, str] = {}
    W3C.inject(carrier, context=trace.set_span_in_context(span))
    assert trace_headers_of(span) == TraceHeaders(
        traceparent=carrier["traceparent"], tracestate=carrier.get("tracestate")
    )
    assert trace_headers_of(trace.INVALID_SPAN) is None


def test_record_trace_headers_are_read_leniently() -> None:
    assert trace_headers_of_record(
        [("TraceParent", TRACEPARENT.encode()), ("tracestate", b"a=1")]
    ) == TraceHeaders(traceparent=TRACEPARENT, tracestate="a=1")
    # Two traceparents: ambiguous, dropped (never a reason to reject the message).
    assert trace_headers_of_record([("traceparent", TRACEPARENT.encode())] * 2).traceparent is None
    assert trace_headers_of_record([("traceparent", b"\xff")]).traceparent is None
    assert trace_headers_of_record([("tracestate", b"a=1")]) == TraceHeaders()


# -- instrumented handlers on the memory stack ------------------------------------------------


def request_cmd(booking: str) -> RequestPayment:
    return RequestPayment(
        inbound=InboundRef(source="saga", message_id=str(uuid.uuid4())),
        booking_id=booking,
        amount=1_000,
        currency="EUR",
        payment_method=TOKEN,
        trace=TraceHeaders(traceparent=TRACEPARENT),
    )


async def test_the_whole_payment_shares_the_request_trace(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    metrics = Metrics()
    store = MemoryUnitOfWorkFactory()
    uows = InstrumentedUnitOfWorkFactory(store, tracer, metrics, db_system="memory")
    processor = InstrumentedProcessor(FakeProcessor(), tracer, metrics)
    clock = Clock()
    parent = context_from_trace(TraceHeaders(traceparent=TRACEPARENT))
    with tracer.start_as_current_span("process request", context=parent, kind=SpanKind.CONSUMER):
        assert await request_payment(request_cmd("bk-1"), uows, clock) is RequestResult.ACCEPTED
    [initiated] = [r.message for r in store.db.outbox]
    assert initiated.trace.traceparent is not None
    assert initiated.trace.traceparent.split("-")[1] == TRACE_ID

    clock.at += timedelta(seconds=2)
    with tracer.start_as_current_span(
        "process initiated", context=context_from_trace(initiated.trace), kind=SpanKind.CONSUMER
    ):
        execute = ExecutePayment(
            inbound=InboundRef(source="payment-service", message_id=str(initiated.event_id)),
            payment_id=uuid.UUID(initiated.key),
            trace=initiated.trace,
        )
        result = await execute_payment(execute, uows, processor, clock)
    assert result is ExecuteResult.COMPLETED
    completed = store.db.outbox[-1].message
    assert completed.type == "payment.completed"
    assert completed.trace.traceparent is not None
    assert completed.trace.traceparent.split("-")[1] == TRACE_ID

    spans = exporter.get_finished_spans()
    assert {trace_id_of(s) for s in spans} == {TRACE_ID}
    names = sorted(s.name for s in spans)
    assert names == [
        "db transaction",
        "db transaction",
        "db transaction",
        "db transaction",  # ChargeStarted, written ahead of the charge
        "fake charge",
        "process initiated",
        "process request",
    ]
    for span in spans:
        assert TOKEN not in repr(dict(span.attributes or {}))
    text = await metrics.render()
    assert "\npayment_initiated_total 1.0\n" in text
    assert 'payment_outcomes_total{outcome="completed"} 1' in text
    assert 'payment_time_to_outcome_seconds_sum{outcome="completed"} 2' in text


async def test_a_duplicate_request_shows_as_a_conflict_not_an_error(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    # Its first try expects a new message and fails; the careful try answers DUPLICATE.
    uows = InstrumentedUnitOfWorkFactory(
        MemoryUnitOfWorkFactory(), tracer, Metrics(), db_system="memory"
    )
    cmd = request_cmd("bk-1")
    with tracer.start_as_current_span("process request"):
        assert await request_payment(cmd, uows, Clock()) is RequestResult.ACCEPTED
        exporter.clear()
        assert await request_payment(cmd, uows, Clock()) is RequestResult.DUPLICATE
    transactions = [s for s in exporter.get_finished_spans() if s.name == "db transaction"]
    assert [(s.attributes or {}).get("db.transaction.conflict") for s in transactions] == [
        "DuplicateMessage",
        None,
    ]
    assert {s.status.status_code.name for s in transactions} == {"UNSET"}


async def test_without_a_span_the_outcome_still_carries_the_request_trace() -> None:
    # OTEL_SDK_DISABLED: no span is in force; the handlers pass the inbound trace along.
    store = MemoryUnitOfWorkFactory()
    uows = InstrumentedUnitOfWorkFactory(store, trace.NoOpTracer(), Metrics())
    clock = Clock()
    await request_payment(request_cmd("bk-2"), uows, clock)
    [initiated] = [r.message for r in store.db.outbox]
    assert initiated.trace.traceparent == TRACEPARENT
    execute = ExecutePayment(
        inbound=InboundRef(source="payment-service", message_id=str(initiated.event_id)),
        payment_id=uuid.UUID(initiated.key),
        trace=initiated.trace,
    )
    await execute_payment(execute, uows, FakeProcessor(), clock)
    assert store.db.outbox[-1].message.trace.traceparent == TRACEPARENT


async def test_a_transaction_outside_a_trace_starts_no_span(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    uows = InstrumentedUnitOfWorkFactory(MemoryUnitOfWorkFactory(), tracer, Metrics())
    async with uows() as uow:
        await uow.outbox.pending(10)
    assert exporter.get_finished_spans() == ()


class Hanging:
    name = "hanging"

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        await asyncio.sleep(10)
        raise AssertionError("unreachable")

    async def lookup(self, request: ChargeRequest) -> ChargeOutcome | None:
        raise OutcomeUnknown("no answer")


def charge_request() -> ChargeRequest:
    return ChargeRequest(
        payment_id=uuid.uuid4(),
        booking_id="bk-3",
        money=Money.of(100, "EUR"),
        payment_method=TOKEN,
        idempotency_key=uuid.uuid4(),
    )


async def test_processor_errors_are_counted_by_kind_and_never_name_the_token(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    metrics = Metrics()
    processor = InstrumentedProcessor(Hanging(), tracer, metrics)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(processor.charge(charge_request()), 0.01)
    with pytest.raises(OutcomeUnknown):
        await processor.lookup(charge_request())
    text = await metrics.render()
    assert (
        'payment_processor_errors_total{kind="timeout",operation="charge",processor="hanging"} 1'
        in text
    )
    assert (
        'payment_processor_errors_total{kind="unknown",operation="lookup",processor="hanging"} 1'
        in text
    )
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["hanging charge"].status.status_code is trace.StatusCode.ERROR
    assert spans["hanging charge"].attributes is not None
    assert spans["hanging charge"].attributes["payment.outcome"] == "timeout"
    for span in spans.values():
        assert TOKEN not in repr(dict(span.attributes or {})) + (span.status.description or "")


async def test_reconciliation_continues_the_stored_trace(
    tracer: Tracer, exporter: InMemorySpanExporter
) -> None:
    metrics = Metrics()
    store = MemoryUnitOfWorkFactory()
    uows = InstrumentedUnitOfWorkFactory(store, tracer, metrics)
    clock = Clock()
    with tracer.start_as_current_span(
        "process request", context=context_from_trace(TraceHeaders(traceparent=TRACEPARENT))
    ):
        await request_payment(request_cmd("bk-4"), uows, clock)
    [initiated] = [r.message for r in store.db.outbox]

    async def stored(payment_id: uuid.UUID) -> TraceHeaders | None:
        return initiated.trace if str(payment_id) == initiated.key else None

    processor = InstrumentedProcessor(FakeProcessor(), tracer, metrics)
    clock.at += timedelta(seconds=120)
    reconciler = Reconciler(
        uows,
        processor,
        clock,
        ExecutionPolicy(),
        threshold_s=60,
        interval_s=1,
        scope=reconcile_scope(tracer, stored),
    )
    assert await reconciler.run_once() == 1
    assert reconciler.actions == {"completed": 1}
    completed = store.db.outbox[-1].message
    assert completed.trace.traceparent is not None
    assert completed.trace.traceparent.split("-")[1] == TRACE_ID
    spans = [s for s in exporter.get_finished_spans() if s.name != "process request"]
    assert "reconcile payment" in {s.name for s in spans}
    assert {trace_id_of(s) for s in spans} == {TRACE_ID}


@pytest.fixture(autouse=True)
def _no_global_provider() -> Iterator[None]:
    # These tests inject their tracer; none of them may rely on (or set) the global one.
    before = trace.get_tracer_provider()
    yield
    assert trace.get_tracer_provider() is before
