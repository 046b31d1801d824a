"""Tracing: the OpenTelemetry SDK set up from the standard OTEL_* variables, and W3C helpers.

Exporters (`OTEL_TRACES_EXPORTER`, a comma-separated list):

- unset: `otlp` when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set,
  otherwise none;
- `otlp`: OTLP over HTTP/protobuf, or gRPC with `OTEL_EXPORTER_OTLP_PROTOCOL=grpc`. The
  exporter packages are optional (`pip install 'payment-service[otlp]'`); without them the
  service logs one warning and runs on without exporting;
- `console`: spans printed as JSON on stdout; `none`: nothing.

The trace context flows even when nothing is exported: the `traceparent` stored with an
outbox row is taken from the span in force when the row is written, so every event of a
payment carries the trace of the request that caused it (contract section 2) whether or
not anyone collects spans. With no exporter the service uses `PropagatingTracerProvider`:
spans with their own ids that continue their parent's trace and record nothing (an SDK
span costs several times more, and would be thrown away). `OTEL_SDK_DISABLED=true` turns
tracing off; events then carry the inbound `traceparent` the handlers pass along.

Sampling (`OTEL_TRACES_SAMPLER`), batching (`OTEL_BSP_*`), the service name
(`OTEL_SERVICE_NAME`, default `payment-service`) and resource attributes are read by the
SDK itself from the same variables.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from payment.application.commands import TraceHeaders

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME: Final = "payment-service"
TRACER_NAME: Final = "payment"
OTLP_EXTRA_HINT: Final = "pip install 'payment-service[otlp]'"

# Contract section 2 names W3C Trace Context: used explicitly, whatever OTEL_PROPAGATORS says.
W3C: Final = TraceContextTextMapPropagator()
_TRACEPARENT: Final = "traceparent"
_PLAIN_TRACEPARENT: Final = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACESTATE: Final = "tracestate"

_OTLP_MODULES: Final = {
    "grpc": (
        "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
        "opentelemetry-exporter-otlp-proto-grpc",
    ),
    "http/protobuf": (
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "opentelemetry-exporter-otlp-proto-http",
    ),
}


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() == "true"


def span_exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    """The span exporters the OTEL_* variables ask for (see the module docstring)."""
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    raw = environ.get("OTEL_TRACES_EXPORTER")
    if raw is None or not raw.strip():
        names = ["otlp"] if endpoint else []
    else:
        names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    if "none" in names:
        return []
    exporters: list[SpanExporter] = []
    for name in dict.fromkeys(names):
        if name == "console":
            exporters.append(ConsoleSpanExporter(service_name=_service_name(environ)))
        elif name == "otlp":
            otlp = _otlp_exporter(environ)
            if otlp is not None:
                exporters.append(otlp)
        else:
            log.warning("telemetry: unknown OTEL_TRACES_EXPORTER %r ignored", name[:40])
    return exporters


def _otlp_exporter(environ: Mapping[str, str]) -> SpanExporter | None:
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    module_name, package = _OTLP_MODULES.get(protocol, _OTLP_MODULES["http/protobuf"])
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        log.warning(
            "telemetry: OTLP trace export requested but %s is not installed (%s);"
            " spans are not exported",
            package,
            OTLP_EXTRA_HINT,
        )
        return None
    # The exporter reads its endpoint, headers, timeout and compression from OTEL_*.
    exporter: SpanExporter = module.OTLPSpanExporter()
    return exporter


def _service_name(environ: Mapping[str, str]) -> str:
    return environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME


def configure_tracing(
    environ: Mapping[str, str] | None = None, *, exporters: Iterable[SpanExporter] | None = None
) -> trace.TracerProvider | None:
    """A tracer provider configured from OTEL_* variables; None if the SDK is disabled.

    The SDK's provider when spans are exported (`exporters` replaces the ones the variables
    ask for: tests pass an in-memory one); a `PropagatingTracerProvider` when none is.
    The provider is not made global: the composition root hands its tracer to the
    adapters, so several services in one process (tests) each keep their own.
    """
    environ = os.environ if environ is None else environ
    if _flag(environ, "OTEL_SDK_DISABLED"):
        return None
    chosen = list(span_exporters(environ) if exporters is None else exporters)
    if not chosen:
        return PropagatingTracerProvider()
    resource = Resource.create({SERVICE_NAME: _service_name(environ)})
    provider = TracerProvider(resource=resource)
    for exporter in chosen:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class PropagatingTracer(Tracer):
    """Spans that record nothing and carry the trace on: for a service exporting no spans.

    A span continues its parent's trace id, flags and trace state with a span id of its
    own; without a valid parent it starts a new, sampled trace (what the SDK's default
    sampler decides). The `traceparent` stored with outbox rows and the ids in log lines
    are therefore what they would be with the SDK. Nothing is timed or kept.
    """

    def __init__(self) -> None:
        self._ids = RandomIdGenerator()

    # Kind, attributes, links, times and exception handling are what a span records: none.
    def start_span(
        self, name: str, context: Context | None = None, *_: Any, **__: Any
    ) -> trace.Span:
        parent = trace.get_current_span(context).get_span_context()
        if parent.is_valid:
            return self._child(parent.trace_id, parent.trace_flags, parent.trace_state)
        return self._child(
            self._ids.generate_trace_id(), trace.TraceFlags(trace.TraceFlags.SAMPLED)
        )

    def continuing(self, headers: TraceHeaders | None) -> trace.Span:
        """`start_span` continuing `headers`, without building the parent's context for
        the usual `traceparent` (telemetry's `start_span_continuing`)."""
        plain = _plain_parent(headers)
        if plain is None:
            return self.start_span("", context_from_trace(headers))
        trace_id, _, flags = plain
        return self._child(trace_id, trace.TraceFlags(flags))

    def _child(
        self,
        trace_id: int,
        flags: trace.TraceFlags,
        state: trace.TraceState = trace.DEFAULT_TRACE_STATE,
    ) -> trace.Span:
        """A span of the trace `trace_id` with a span id of its own."""
        own = trace.SpanContext(
            trace_id=trace_id,
            span_id=self._ids.generate_span_id(),
            is_remote=False,
            trace_flags=flags,
            trace_state=state,
        )
        return trace.NonRecordingSpan(own)

    # The API declares its own (private) context-manager type; a generator one behaves alike.
    @contextlib.contextmanager
    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: Context | None = None,
        *_: Any,
        end_on_exit: bool = True,
        **__: Any,
    ) -> Iterator[trace.Span]:
        span = self.start_span(name, context)
        with trace.use_span(span, end_on_exit=end_on_exit) as current:
            yield current


class PropagatingTracerProvider(trace.TracerProvider):
    """Hands out `PropagatingTracer`s: the provider when no span is exported."""

    def get_tracer(self, *args: Any, **kwargs: Any) -> Tracer:
        return PropagatingTracer()


def tracer_provider_resource() -> Iterator[trace.TracerProvider | None]:
    """The process's tracer provider for a dependency-injector `Resource`.

    Shut down (flushing spans still batched) when the container's resources are.
    """
    provider = configure_tracing()
    try:
        yield provider
    finally:
        if isinstance(provider, TracerProvider):
            provider.shutdown()


def records_spans(tracer: Tracer) -> bool:
    """False for the tracers whose spans are never recorded (`PropagatingTracer`, the API's
    `NoOpTracer`): their spans only carry ids, so a span nothing else reads need not be
    made. True for any other tracer (the SDK's may record, whatever its sampler says)."""
    return not isinstance(tracer, (PropagatingTracer, trace.NoOpTracer))


def tracer_of(provider: trace.TracerProvider | None) -> Tracer:
    """The service's tracer from `provider`, or one that records nothing."""
    if provider is None:
        return trace.NoOpTracer()
    return provider.get_tracer(TRACER_NAME)


# -- W3C Trace Context ------------------------------------------------------------------


def context_from_trace(headers: TraceHeaders | None) -> Context:
    """The context a span continuing `headers` should have as parent.

    An empty (root) context when there is no valid `traceparent`: a span started with it
    begins a new trace instead of silently joining whatever context is current.
    """
    if headers is None or headers.traceparent is None:
        return Context()
    plain = _plain_parent(headers)
    if plain is not None:
        trace_id, span_id, flags = plain
        parent = trace.SpanContext(
            trace_id=trace_id, span_id=span_id, is_remote=True, trace_flags=trace.TraceFlags(flags)
        )
        return trace.set_span_in_context(trace.NonRecordingSpan(parent), Context())
    carrier = {_TRACEPARENT: headers.traceparent}
    if headers.tracestate is not None:
        carrier[_TRACESTATE] = headers.tracestate
    return W3C.extract(carrier, context=Context())


def _plain_parent(headers: TraceHeaders | None) -> tuple[int, int, int] | None:
    """(trace id, span id, flags) of the usual case, a valid version 00 `traceparent`
    without `tracestate`, read without the propagator's per-call regex lookup (it runs
    for every consumed message); None for anything else (the propagator decides)."""
    if headers is None or headers.traceparent is None or headers.tracestate is not None:
        return None
    match = _PLAIN_TRACEPARENT.fullmatch(headers.traceparent)
    if match is None:
        return None
    trace_id, span_id = int(match[1], 16), int(match[2], 16)
    if not (trace_id and span_id):
        return None
    return trace_id, span_id, int(match[3], 16)


def start_span_continuing(
    tracer: Tracer, name: str, headers: TraceHeaders | None, *, kind: trace.SpanKind
) -> trace.Span:
    """A span continuing the trace of `headers` (a consumed message's, or those stored
    with an outbox row), not made current: what `tracer.start_span(name,
    context_from_trace(headers), kind=kind)` gives.

    Exceptions are neither recorded nor turned into a status by the span: its caller
    says what failed. A `PropagatingTracer` makes it without the context in between.
    """
    if type(tracer) is PropagatingTracer:
        return tracer.continuing(headers)
    return tracer.start_span(
        name,
        context=context_from_trace(headers),
        kind=kind,
        record_exception=False,
        set_status_on_exception=False,
    )


def trace_headers_of_record(headers: Iterable[tuple[str, bytes | None]]) -> TraceHeaders:
    """The W3C headers of a Kafka record, read leniently like the CloudEvents codec does.

    Header names are matched case-insensitively; a duplicated or non-UTF-8 header is
    dropped (an ambiguous trace context is ignored, never a reason to reject a message).
    """
    seen: dict[str, str | None] = {}
    for raw_name, raw_value in headers:
        name = raw_name.lower()
        if name not in (_TRACEPARENT, _TRACESTATE):
            continue
        try:
            text = None if raw_value is None else raw_value.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        seen[name] = None if name in seen else text
    traceparent = seen.get(_TRACEPARENT)
    return TraceHeaders(
        traceparent=traceparent, tracestate=seen.get(_TRACESTATE) if traceparent else None
    )


def current_trace_headers() -> TraceHeaders | None:
    """W3C headers of the span in force, or None if there is none (no valid context)."""
    return trace_headers_of(trace.get_current_span())


def trace_headers_of(span: trace.Span) -> TraceHeaders | None:
    """W3C headers naming `span` as the parent, or None for a span with no valid context.

    Formatted as the W3C propagator's `inject` formats them, without a context to carry
    them there: this runs once for every consumed message.
    """
    context = span.get_span_context()
    if not context.is_valid:
        return None
    traceparent = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    tracestate = context.trace_state.to_header() if context.trace_state else None
    return TraceHeaders(traceparent=traceparent, tracestate=tracestate or None)


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the span in force, for log lines; None outside a trace."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)
