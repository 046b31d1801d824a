"""Spans, metrics and lifecycle log lines around any UnitOfWork.

Decorators the composition root wraps around the real adapters, so the application layer
stays free of OpenTelemetry and the memory and PostgreSQL adapters get the same
instrumentation (the gateway's is `InstrumentedProcessor`, instrumented_processor.py):

- `InstrumentedUnitOfWork`: a span per database transaction (inside a trace only, so the
  relay's and the reconciler's polling start no traces of their own); the trace context
  stamped on outbox rows as they are written; and, once a transaction has committed, the
  metrics and log lines of the payment events it recorded. Counting at commit means a
  transaction lost to a concurrent writer (and retried) counts nothing, and the reconciler's
  outcomes are counted like the executor's.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import Token
from datetime import datetime
from typing import Any, Self

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from payment.adapters.observability.instrumented_processor import InstrumentedProcessor
from payment.adapters.observability.log_budget import UNLIMITED, LogBudget
from payment.adapters.observability.metrics import Metrics
from payment.adapters.observability.span_attributes import ATTR_ERROR_TYPE, ATTR_PAYMENT_ID
from payment.adapters.observability.telemetry import context_from_trace, current_trace_headers
from payment.application.commands import TraceHeaders
from payment.application.errors import RETRYABLE_CONFLICTS
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

log = logging.getLogger("payment.lifecycle")

__all__ = [
    "InitiationTimes",
    "InstrumentedProcessor",  # where the composition root has always found it
    "InstrumentedUnitOfWork",
    "InstrumentedUnitOfWorkFactory",
    "reconcile_scope",
]

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

    async def pending(
        self, limit: int, skip_keys: Collection[str] = (), skip_positions: Collection[int] = ()
    ) -> list[OutboxRecord]:
        return await self._inner.pending(limit, skip_keys, skip_positions)

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

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            await self._inner.__aexit__(*exc_info)
        finally:
            self._end_span(exc_info[1])

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
        if isinstance(exc, RETRYABLE_CONFLICTS):
            # A lost race, or a first try that expected a new message (or a free booking)
            # and found otherwise: the handler tries again, the careful way. Not an error.
            span.set_attribute("db.transaction.conflict", type(exc).__name__)
        elif exc is not None:
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
                self._lifecycle("payment initiated", event, booking_id=event.booking_id)
            elif isinstance(event, PaymentCompleted):
                outcomes["completed", None] += 1
                self._observe_latency(event, "completed")
                self._lifecycle("payment completed", event, processor=event.processor)
            elif isinstance(event, PaymentFailed):
                outcomes["failed", event.reason] += 1
                self._observe_latency(event, "failed")
                self._lifecycle(
                    "payment failed", event, reason=event.reason, decline_code=event.decline_code
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

    def _lifecycle(self, message: str, event: AnyPaymentEvent, **fields: object) -> None:
        """One lifecycle log line of `event`, within the log budget."""
        if self._budget.allow(message):
            extra = {"payment_id": str(event.payment_id), **fields, "version": event.version}
            log.info(message, extra=extra)

    def _observe_refund(self, event: RefundRequested | PaymentRefunded | RefundFailed) -> None:
        refund_id = str(event.refund_id)
        if isinstance(event, RefundRequested):
            self._metrics.refunds.add(1, {"result": "requested"})
            self._lifecycle("refund requested", event, refund_id=refund_id, amount=event.amount)
        elif isinstance(event, PaymentRefunded):
            self._metrics.refunds.add(1, {"result": "refunded"})
            self._lifecycle("payment refunded", event, refund_id=refund_id, amount=event.amount)
        else:
            self._metrics.refunds.add(1, {"result": "failed", "reason": event.reason})
            self._lifecycle("refund failed", event, refund_id=refund_id, reason=event.reason)

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
