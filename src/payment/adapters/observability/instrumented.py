"""Spans, metrics and lifecycle log lines around any PaymentProcessor and any UnitOfWork.

Decorators the composition root wraps around the real adapters, so the application layer
stays free of OpenTelemetry and the memory and PostgreSQL adapters get the same
instrumentation:

- `InstrumentedProcessor`: a CLIENT span per gateway call, its latency and its errors.
- `InstrumentedUnitOfWork`: a span per database transaction (inside a trace only, so the
  relay's and the reconciler's polling start no traces of their own); the trace context
  stamped on outbox rows as they are written; and, once a transaction has committed, the
  metrics and log lines of the payment events it recorded. Counting at commit means a
  transaction lost to a concurrent writer (and retried) counts nothing, and the reconciler's
  outcomes are counted like the executor's.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import Token
from datetime import datetime
from types import TracebackType
from typing import Final, Self, TypeVar

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from payment.adapters.observability.log_budget import UNLIMITED, LogBudget
from payment.adapters.observability.metrics import Metrics
from payment.adapters.observability.telemetry import context_from_trace, current_trace_headers
from payment.application.commands import TraceHeaders
from payment.application.messages import OutboundMessage
from payment.application.ports import (
    EventStore,
    Inbox,
    Outbox,
    OutboxRecord,
    PaymentIndex,
    StoresPayments,
    StreamAppend,
    UnitOfWork,
    UnitOfWorkFactory,
)
from payment.domain.events import (
    AnyPaymentEvent,
    PaymentCompleted,
    PaymentFailed,
    PaymentFlaggedForReview,
    PaymentInitiated,
    PaymentRefunded,
    RefundFailed,
    RefundRequested,
)
from payment.domain.processor import (
    Approved,
    ChargeOutcome,
    ChargeRequest,
    Declined,
    OutcomeUnknown,
    PaymentProcessor,
    ProcessorUnavailable,
    RefundDeclined,
    Refunded,
    RefundOutcome,
    RefundRequest,
)

log = logging.getLogger("payment.lifecycle")

_T = TypeVar("_T")
_Req = TypeVar("_Req", ChargeRequest, RefundRequest)

# Span attributes of this service (no token, key or card data is ever one of them).
ATTR_PAYMENT_ID: Final = "payment.id"
ATTR_BOOKING_ID: Final = "payment.booking_id"
ATTR_PROCESSOR: Final = "payment.processor"
ATTR_OUTCOME: Final = "payment.outcome"
ATTR_EVENT_TYPE: Final = "cloudevents.event_type"
ATTR_ERROR_TYPE: Final = "error.type"


# -- processor ---------------------------------------------------------------------------

_ERROR_KINDS: Final = ("unavailable", "unknown", "timeout", "error")


class InstrumentedProcessor:
    """A PaymentProcessor that traces, times and counts every call of the one it wraps.

    Results: `approved`, `declined`, `not_found` (a lookup that found nothing), or an
    error kind: `unavailable` (no charge made), `unknown` (the charge may have happened),
    `timeout` (cancelled: the handler's call timeout, or shutdown) and `error` (a bug).
    """

    def __init__(
        self,
        inner: PaymentProcessor,
        tracer: Tracer,
        metrics: Metrics,
        *,
        log_budget: LogBudget = UNLIMITED,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self._tracer = tracer
        self._metrics = metrics
        self._budget = log_budget
        for operation in ("charge", "lookup", "refund", "lookup_refund"):
            for kind in _ERROR_KINDS:
                metrics.processor_errors.add(
                    0, {"processor": self.name, "operation": operation, "kind": kind}
                )

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        return await self._call("charge", request, self.inner.charge)

    async def lookup(self, request: ChargeRequest) -> ChargeOutcome | None:
        return await self._call("lookup", request, self.inner.lookup)

    async def refund(self, request: RefundRequest) -> RefundOutcome:
        return await self._call("refund", request, self.inner.refund)

    async def lookup_refund(self, request: RefundRequest) -> RefundOutcome | None:
        return await self._call("lookup_refund", request, self.inner.lookup_refund)

    async def _call(
        self,
        operation: str,
        request: _Req,
        call: Callable[[_Req], Awaitable[_T]],
    ) -> _T:
        ids = {"payment_id": str(request.payment_id), "booking_id": request.booking_id}
        if isinstance(request, RefundRequest):
            ids["refund_id"] = str(request.refund_id)
        started = time.perf_counter()
        result = "error"
        with self._tracer.start_as_current_span(
            f"{self.name} {operation}",
            kind=SpanKind.CLIENT,
            attributes={
                ATTR_PAYMENT_ID: ids["payment_id"],
                ATTR_BOOKING_ID: request.booking_id,
                ATTR_PROCESSOR: self.name,
                "payment.operation": operation,
                **({"payment.refund_id": ids["refund_id"]} if "refund_id" in ids else {}),
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                outcome = await call(request)
            except ProcessorUnavailable:
                result = "unavailable"
                raise
            except OutcomeUnknown:
                result = "unknown"
                raise
            except asyncio.CancelledError:
                result = "timeout"
                raise
            except Exception as exc:
                span.set_attribute(ATTR_ERROR_TYPE, type(exc).__name__)
                raise
            else:
                result = _result_of(outcome)
                if isinstance(outcome, Declined | RefundDeclined):
                    span.set_attribute("payment.decline_code", outcome.code)
                return outcome
            finally:
                elapsed = time.perf_counter() - started
                span.set_attribute(ATTR_OUTCOME, result)
                labels = {"processor": self.name, "operation": operation}
                self._metrics.processor_call_duration.record(elapsed, {**labels, "result": result})
                if result in _ERROR_KINDS:
                    span.set_status(Status(StatusCode.ERROR, result))
                    self._metrics.processor_errors.add(1, {**labels, "kind": result})
                    log.warning(
                        "processor %s %s: %s after %.3fs",
                        self.name,
                        operation,
                        result,
                        elapsed,
                        extra={**ids, "processor": self.name, "result": result},
                    )
                elif self._budget.allow(f"processor {operation}"):
                    log.info(
                        "processor %s %s: %s",
                        self.name,
                        operation,
                        result,
                        extra={**ids, "processor": self.name, "result": result},
                    )


def _result_of(outcome: object) -> str:
    if isinstance(outcome, Approved):
        return "approved"
    if isinstance(outcome, Declined | RefundDeclined):
        return "declined"
    if isinstance(outcome, Refunded):
        return "refunded"
    return "not_found" if outcome is None else type(outcome).__name__.lower()


# -- unit of work ------------------------------------------------------------------------


# How many loaded-but-unfinished payments' start times the factory remembers for the
# time-to-outcome metric; past it the oldest are forgotten (their outcome goes untimed).
_STARTS_KEPT = 65_536


class InitiationTimes:
    """When loaded payments began, shared by the units of work of one factory.

    The executor loads a payment in one unit of work and records its outcome in another
    (without loading it again): the outcome's unit of work finds the start time here.
    """

    def __init__(self, limit: int = _STARTS_KEPT) -> None:
        self._limit = limit
        self._starts: dict[uuid.UUID, datetime] = {}

    def remember(self, stream_id: uuid.UUID, events: Sequence[AnyPaymentEvent]) -> None:
        if events and isinstance(events[0], PaymentInitiated):
            self._starts[stream_id] = events[0].occurred_at
            if len(self._starts) > self._limit:
                del self._starts[next(iter(self._starts))]

    def take(self, stream_id: uuid.UUID) -> datetime | None:
        return self._starts.pop(stream_id, None)


class _RecordingEventStore:
    """Passes through; remembers what was appended, and when each loaded stream began."""

    def __init__(self, inner: EventStore, starts: InitiationTimes) -> None:
        self._inner = inner
        self.appended: list[AnyPaymentEvent] = []
        self.initiated_at = starts

    async def load(self, stream_id: uuid.UUID) -> list[AnyPaymentEvent]:
        events = await self._inner.load(stream_id)
        self.initiated_at.remember(stream_id, events)
        return events

    async def load_many(
        self, stream_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, list[AnyPaymentEvent]]:
        found = await self._inner.load_many(stream_ids)
        for stream_id, events in found.items():
            self.initiated_at.remember(stream_id, events)
        return found

    async def append(
        self, stream_id: uuid.UUID, expected_version: int, events: Sequence[AnyPaymentEvent]
    ) -> None:
        await self._inner.append(stream_id, expected_version, events)
        self.appended.extend(events)

    async def append_many(self, appends: Sequence[StreamAppend]) -> None:
        await self._inner.append_many(appends)
        for a in appends:
            self.appended.extend(a.events)


class _TraceStampingOutbox:
    """Stores with each outbox row the trace context in force when it is written.

    Why here: this is the one place every outbound message passes, whichever handler
    wrote it (request, execution, reconciliation, re-publication), and the span in force
    is that of the work that caused it (the consumer span continuing the inbound
    `traceparent`, or the reconciler's span continuing the payment's stored one). The
    relay later publishes the row with exactly this `traceparent`. Outside any span (the
    SDK disabled) the message keeps the trace the handler gave it.
    """

    def __init__(self, inner: Outbox) -> None:
        self._inner = inner
        self.written: list[OutboundMessage] = []

    async def add(self, messages: Sequence[OutboundMessage]) -> None:
        headers = current_trace_headers()
        if headers is not None:
            messages = [msgspec.structs.replace(m, trace=headers) for m in messages]
        await self._inner.add(messages)
        self.written.extend(messages)

    async def pending(self, limit: int, skip_keys: Collection[str] = ()) -> list[OutboxRecord]:
        return await self._inner.pending(limit, skip_keys)

    async def mark_published(self, positions: Sequence[int], at: datetime) -> None:
        await self._inner.mark_published(positions, at)


class InstrumentedUnitOfWork(StoresPayments):
    """A UnitOfWork traced as one span, stamping outbox rows, observed once committed."""

    def __init__(
        self,
        inner: UnitOfWork,
        tracer: Tracer,
        metrics: Metrics,
        *,
        db_system: str,
        starts: InitiationTimes | None = None,
        log_budget: LogBudget = UNLIMITED,
    ) -> None:
        self._inner = inner
        self._tracer = tracer
        self._metrics = metrics
        self._db_system = db_system
        self._events = _RecordingEventStore(inner.events, starts or InitiationTimes())
        self._budget = log_budget
        self._outbox = _TraceStampingOutbox(inner.outbox)
        self._span: Span | None = None
        self._token: Token[Context] | None = None
        self._committed = False

    @property
    def events(self) -> EventStore:
        return self._events

    @property
    def payments(self) -> PaymentIndex:
        return self._inner.payments

    @property
    def outbox(self) -> Outbox:
        return self._outbox

    @property
    def inbox(self) -> Inbox:
        return self._inner.inbox

    async def __aenter__(self) -> Self:
        # Only inside a trace: a transaction of a polling loop would start a trace per poll.
        if trace.get_current_span().get_span_context().is_valid:
            span = self._tracer.start_span(
                "db transaction",
                kind=SpanKind.CLIENT,
                attributes={"db.system.name": self._db_system},
            )
            self._span = span
            self._token = otel_context.attach(trace.set_span_in_context(span))
        try:
            await self._inner.__aenter__()
        except BaseException as exc:
            self._end_span(exc)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._inner.__aexit__(exc_type, exc, tb)
        finally:
            self._end_span(exc)

    async def commit(self) -> None:
        await self._inner.commit()
        self._committed = True
        self._observe_commit()

    def _end_span(self, exc: BaseException | None) -> None:
        span, self._span = self._span, None
        if span is None:
            return
        span.set_attribute("db.transaction.outcome", "commit" if self._committed else "rollback")
        if self._events.appended:
            first = self._events.appended[0]
            span.set_attribute(ATTR_PAYMENT_ID, str(first.payment_id))
            span.set_attribute("payment.events", [type(e).__name__ for e in self._events.appended])
        if self._outbox.written:
            span.set_attribute("payment.outbox", [m.type for m in self._outbox.written])
        if exc is not None:
            span.set_attribute(ATTR_ERROR_TYPE, type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        if self._token is not None:
            otel_context.detach(self._token)
            self._token = None
        span.end()

    def _observe_commit(self) -> None:
        # Counters are added once per label set per commit (a batch commits hundreds of
        # events), histograms once per outcome; ids are formatted only for a log line.
        initiated = 0
        outcomes: Counter[tuple[str, str | None]] = Counter()
        for event in self._events.appended:
            if isinstance(event, PaymentInitiated):
                initiated += 1
                if self._budget.allow("payment initiated"):
                    log.info(
                        "payment initiated",
                        extra={
                            "payment_id": str(event.payment_id),
                            "booking_id": event.booking_id,
                            "version": event.version,
                        },
                    )
            elif isinstance(event, PaymentCompleted):
                outcomes["completed", None] += 1
                self._observe_latency(event, "completed")
                if self._budget.allow("payment completed"):
                    log.info(
                        "payment completed",
                        extra={
                            "payment_id": str(event.payment_id),
                            "processor": event.processor,
                            "version": event.version,
                        },
                    )
            elif isinstance(event, PaymentFailed):
                outcomes["failed", event.reason] += 1
                self._observe_latency(event, "failed")
                if self._budget.allow("payment failed"):
                    log.info(
                        "payment failed",
                        extra={
                            "payment_id": str(event.payment_id),
                            "reason": event.reason,
                            "decline_code": event.decline_code,
                            "version": event.version,
                        },
                    )
            elif isinstance(event, RefundRequested | PaymentRefunded | RefundFailed):
                self._observe_refund(event)
            elif isinstance(event, PaymentFlaggedForReview):
                self._metrics.payments_flagged.add(1)
                log.warning(
                    "payment flagged for manual review: %s",
                    event.detail,
                    extra={"payment_id": str(event.payment_id)},
                )
        if initiated:
            self._metrics.payments_initiated.add(initiated)
        for (outcome, reason), count in outcomes.items():
            labels = (
                {"outcome": outcome} if reason is None else {"outcome": outcome, "reason": reason}
            )
            self._metrics.outcomes.add(count, labels)

    def _observe_refund(self, event: RefundRequested | PaymentRefunded | RefundFailed) -> None:
        ids = {"payment_id": str(event.payment_id), "refund_id": str(event.refund_id)}
        if isinstance(event, RefundRequested):
            self._metrics.refunds.add(1, {"result": "requested"})
            if self._budget.allow("refund requested"):
                log.info("refund requested", extra={**ids, "amount": event.amount})
        elif isinstance(event, PaymentRefunded):
            self._metrics.refunds.add(1, {"result": "refunded"})
            if self._budget.allow("payment refunded"):
                log.info("payment refunded", extra={**ids, "amount": event.amount})
        else:
            self._metrics.refunds.add(1, {"result": "failed", "reason": event.reason})
            if self._budget.allow("refund failed"):
                log.info("refund failed", extra={**ids, "reason": event.reason})

    def _observe_latency(self, event: PaymentCompleted | PaymentFailed, outcome: str) -> None:
        started = self._events.initiated_at.take(event.payment_id)
        if started is not None:
            elapsed = (event.occurred_at - started).total_seconds()
            self._metrics.time_to_outcome.record(max(elapsed, 0.0), {"outcome": outcome})


class InstrumentedUnitOfWorkFactory:
    """A UnitOfWorkFactory giving `InstrumentedUnitOfWork`s around another factory's."""

    def __init__(
        self,
        inner: UnitOfWorkFactory,
        tracer: Tracer,
        metrics: Metrics,
        *,
        db_system: str = "postgresql",
        log_budget: LogBudget = UNLIMITED,
    ) -> None:
        self.inner = inner
        self._tracer = tracer
        self._metrics = metrics
        self._db_system = db_system
        self._starts = InitiationTimes()
        self._budget = log_budget

    def __call__(self) -> InstrumentedUnitOfWork:
        return InstrumentedUnitOfWork(
            self.inner(),
            self._tracer,
            self._metrics,
            db_system=self._db_system,
            starts=self._starts,
            log_budget=self._budget,
        )


# -- reconciler ----------------------------------------------------------------------------

StoredTrace = Callable[[uuid.UUID], Awaitable[TraceHeaders | None]]


def reconcile_scope(
    tracer: Tracer, stored_trace: StoredTrace, name: str = "reconcile payment"
) -> Callable[[uuid.UUID], AbstractAsyncContextManager[None]]:
    """The reconciler's per-payment scope: a span in the trace of the payment's request
    (`name`: the refund worker's is "settle refunds").

    Reconciliation happens long after the request's consumer span ended; continuing the
    trace stored with the payment's first outbox row keeps the gateway calls and the
    outcome event (whose row is stamped from this span) in the request's trace.
    """

    @asynccontextmanager
    async def scope(payment_id: uuid.UUID) -> AsyncIterator[None]:
        parent = context_from_trace(await stored_trace(payment_id))
        with tracer.start_as_current_span(
            name,
            context=parent,
            attributes={ATTR_PAYMENT_ID: str(payment_id)},
            record_exception=False,
        ):
            yield

    return scope
