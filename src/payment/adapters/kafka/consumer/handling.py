"""Handling one message: decode, route, run its command, retry or dead-letter it; and what
each result is worth in metrics, spans and logs (the batch path reports the same way)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka.structs import ConsumerRecord
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from payment.adapters.kafka.cloudevents import InboundEvent, PoisonMessage
from payment.adapters.kafka.consumer.dead_lettering import Parking
from payment.adapters.kafka.consumer.routing import (
    Route,
    Topics,
    decode,
    execute_command,
    received_trace,
    refund_command,
    request_command,
    tag_event,
)
from payment.adapters.observability.log_budget import LogBudget
from payment.adapters.observability.metrics import Metrics
from payment.adapters.observability.span_attributes import process_attributes, process_span_name
from payment.adapters.observability.span_values import untrusted_attribute
from payment.adapters.observability.telemetry import (
    start_span_continuing,
    trace_headers_of_record,
)
from payment.application.commands import InboundRef, SettleRefunds, TraceHeaders
from payment.application.errors import PaymentConflict
from payment.application.handlers import (
    ExecuteResult,
    ExecutionPolicy,
    RequestPolicy,
    RequestResult,
    execute_payment,
    request_payment,
)
from payment.application.ports import Clock, UnitOfWorkFactory
from payment.application.refunds import RefundResult, Refunds
from payment.application.retry import Backoff
from payment.domain.processor import PaymentProcessor

log = logging.getLogger(__name__)

# A handler error that is not an outage is retried this many times, then dead-lettered:
# a bug must not block a partition forever, an outage must never dead-letter anything.
MAX_HANDLER_ERRORS = 5

# Request results worth a log line of their own; an accepted request is logged by the
# unit of work as "payment initiated".
_NOTABLE_REQUESTS = frozenset(
    {
        RequestResult.DUPLICATE,
        RequestResult.REJECTED,
        RequestResult.REPLAYED,
        RequestResult.IN_FLIGHT,
    }
)
_NOTABLE_EXECUTIONS = frozenset(
    {ExecuteResult.DUPLICATE, ExecuteResult.NOT_FOUND, ExecuteResult.ALREADY_TERMINAL}
)
# How a notable result's log line names the message it came from.
_LOGGED_AS = {"request": "request", "execution": "payment.initiated"}


@dataclass(frozen=True)
class Handlers:
    """What handling a message needs: the application and its collaborators."""

    topics: Topics
    uow_factory: UnitOfWorkFactory
    processor: PaymentProcessor
    clock: Clock
    metrics: Metrics
    request_policy: RequestPolicy
    policy: ExecutionPolicy
    is_transient: Callable[[BaseException], bool]
    backoff: Callable[[], Backoff]
    parking: Parking
    tracer: Tracer
    consumer_group: str | None
    budget: LogBudget
    refunds: Refunds | None


class MessageHandler:
    """One message at a time, with one CONSUMER span for all its retries."""

    def __init__(self, handlers: Handlers) -> None:
        self.h = handlers

    def span(self, record: ConsumerRecord[bytes, bytes], sent: TraceHeaders | None = None) -> Span:
        """The CONSUMER span of one message, continuing the sender's trace (not made current).

        `sent` is the sender's trace context when the record's envelope is already decoded
        (the batch path); otherwise it is read from the record's headers. The span's
        attributes are worked out only if it records (`PropagatingTracer`'s spans do not).
        """
        if sent is None:
            sent = trace_headers_of_record(record.headers or ())
        span = start_span_continuing(
            self.h.tracer, process_span_name(record.topic), sent, kind=SpanKind.CONSUMER
        )
        if span.is_recording():
            span.set_attributes(
                process_attributes(
                    record.topic, record.partition, record.offset, self.h.consumer_group
                )
            )
        return span

    async def handle(self, record: ConsumerRecord[bytes, bytes], *, counted: bool = False) -> None:
        with trace.use_span(
            self.span(record),
            end_on_exit=True,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            backoff = Backoff(initial=1.0, maximum=30.0)
            while True:
                try:
                    await self._handle_in(record, span, counted=counted)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # The error handling itself failed (dead-letter publish, logging,
                    # metrics): the message is neither handled nor parked, so it must
                    # not be let go. Try the whole thing again.
                    delay = backoff.next()
                    log.exception(
                        "consumer: could not handle or park %s[%d]@%d; retrying in %.1fs",
                        record.topic,
                        record.partition,
                        record.offset,
                        delay,
                    )
                    await asyncio.sleep(delay)

    async def _handle_in(
        self, record: ConsumerRecord[bytes, bytes], span: Span, *, counted: bool
    ) -> None:
        if record.topic == self.h.topics.request and not counted:
            # Once per delivery, before decoding: retries do not count again, poison does.
            self.h.metrics.requests_received.add(1)
        errors = 0
        backoff = self.h.backoff()
        while True:
            try:
                await self._process(record)
                return
            except PoisonMessage as exc:
                await self.h.parking.park(record, exc.reason, cause="poison")
                return
            except asyncio.CancelledError:
                span.set_attribute("error.type", "cancelled")
                raise
            except Exception as exc:  # the outermost loop: log, count, keep going
                delay = backoff.next()
                where = (record.topic, record.partition, record.offset)
                if self.h.is_transient(exc):
                    # An outage (database, broker): wait and retry for as long as it
                    # lasts; never a dead letter, however long.
                    self._retrying(span, exc, "transient")
                    log.warning(
                        "consumer: %s at %s[%d]@%d; retrying in %.1fs",
                        _error_name(exc),
                        *where,
                        delay,
                    )
                else:
                    errors += 1
                    self._retrying(span, exc, "error")
                    log.exception(
                        "consumer: handler error %d/%d at %s[%d]@%d",
                        errors,
                        MAX_HANDLER_ERRORS,
                        *where,
                    )
                    if errors >= MAX_HANDLER_ERRORS:
                        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                        await self.h.parking.park(
                            record, f"handler error: {type(exc).__name__}", cause="handler_error"
                        )
                        return
            await asyncio.sleep(delay)

    def _retrying(self, span: Span, exc: Exception, kind: str) -> None:
        self.h.metrics.handler_retries.add(1, {"kind": kind})
        span.add_event("retry", {"error.type": type(exc).__name__, "kind": kind})

    async def _process(self, record: ConsumerRecord[bytes, bytes]) -> None:
        route = self.h.topics.route(record.topic)
        event = decode(record, route)
        tag_event(trace.get_current_span(), event)
        if route is Route.REQUEST:
            await self._on_request(record, event)
        elif route is Route.INITIATED:
            await self._on_initiated(event)
        else:
            await self._on_refund(event)

    async def _on_request(self, record: ConsumerRecord[bytes, bytes], event: InboundEvent) -> None:
        cmd = request_command(event, received_trace(event))
        span = trace.get_current_span()
        span.set_attribute("payment.booking_id", untrusted_attribute(cmd.booking_id))
        try:
            result = await request_payment(
                cmd, self.h.uow_factory, self.h.clock, self.h.request_policy
            )
        except PaymentConflict as exc:
            await self.conflict(record, cmd.inbound, exc, span)
            return
        self.requested(event, cmd.booking_id, result, span)

    async def conflict(
        self,
        record: ConsumerRecord[bytes, bytes],
        inbound: InboundRef,
        exc: PaymentConflict,
        span: Span,
    ) -> None:
        span.set_attribute("payment.id", str(exc.payment_id))
        reason = f"conflict: {exc.detail} (payment {exc.payment_id})"
        await self.h.parking.park(record, reason, cause="conflict")
        async with self.h.uow_factory() as uow:
            if await uow.inbox.mark(inbound.source, inbound.message_id, self.h.clock.now()):
                await uow.commit()

    async def _on_refund(self, event: InboundEvent) -> None:
        refunds = self.h.refunds
        assert refunds is not None  # given with the refund topic
        cmd = refund_command(event)
        span = trace.get_current_span()
        span.set_attribute("payment.booking_id", cmd.booking_id)
        result, payment_id = await refunds.request(cmd)
        span.set_attribute("payment.refund.result", result.value)
        self.h.metrics.refund_requests_handled.add(1, {"result": result.value})
        if payment_id is not None:
            span.set_attribute("payment.id", str(payment_id))
        if result is RefundResult.ACCEPTED and payment_id is not None:
            # Recorded and committed: from here a crash leaves it to the refund worker.
            settled = await refunds.settle(SettleRefunds(payment_id=payment_id, trace=cmd.trace))
            span.set_attribute("payment.refund.settled", [r.value for r in settled])
        if result is not RefundResult.ACCEPTED and self.h.budget.allow(f"refund {result.value}"):
            log.info(
                "refund request %s: %s",
                event.id,
                result.value,
                extra={"booking_id": cmd.booking_id, "result": result.value},
            )

    async def _on_initiated(self, event: InboundEvent) -> None:
        cmd = execute_command(event, received_trace(event))
        span = trace.get_current_span()
        span.set_attribute("payment.id", str(cmd.payment_id))
        started = time.perf_counter()
        result = await execute_payment(
            cmd, self.h.uow_factory, self.h.processor, self.h.clock, self.h.policy
        )
        self.executed(event, cmd.payment_id, result, span, time.perf_counter() - started)

    # -- reporting (both paths) ----------------------------------------------------------

    def requested(
        self,
        event: InboundEvent,
        booking_id: str,
        result: RequestResult,
        span: Span,
        tally: Counter[RequestResult] | None = None,
    ) -> None:
        if tally is None:
            self.count_requests(result, 1)
        else:
            tally[result] += 1
        self._noted(
            span,
            event,
            result,
            _NOTABLE_REQUESTS,
            "request",
            lambda: {"booking_id": untrusted_attribute(booking_id)},
        )

    def count_requests(self, result: RequestResult, count: int) -> None:
        metrics = self.h.metrics
        metrics.requests_handled.add(count, {"result": result.value})
        if result is RequestResult.DUPLICATE:
            metrics.requests_deduplicated.add(count)
        elif result is RequestResult.REJECTED:
            metrics.requests_invalid.add(count)
            metrics.outcomes.add(count, {"outcome": "failed", "reason": "invalid_request"})

    def executed(
        self,
        event: InboundEvent,
        payment_id: uuid.UUID,
        result: ExecuteResult,
        span: Span,
        elapsed: float,
        tally: Counter[ExecuteResult] | None = None,
    ) -> None:
        # Every message's duration (a batch's messages share theirs); counts per batch.
        self.h.metrics.execution_duration.record(elapsed, {"result": result.value})
        if tally is not None:
            tally[result] += 1
        else:
            self.h.metrics.executions.add(1, {"result": result.value})
        self._noted(
            span,
            event,
            result,
            _NOTABLE_EXECUTIONS,
            "execution",
            lambda: {"payment_id": str(payment_id)},
        )

    def _noted(
        self,
        span: Span,
        event: InboundEvent,
        result: RequestResult | ExecuteResult,
        notable: frozenset[RequestResult] | frozenset[ExecuteResult],
        kind: str,
        subject: Callable[[], dict[str, str]],
    ) -> None:
        """The result on the message's span, and a log line if notable (within budget), its
        `subject` (what the message is about) worked out only then."""
        span.set_attribute("payment.result", result.value)
        if result in notable and self.h.budget.allow(f"{kind} {result.value}"):
            log.info(
                "%s %s: %s",
                _LOGGED_AS[kind],
                event.id[:80],
                result.value,
                extra={**subject(), "result": result.value},
            )


def _error_name(exc: BaseException) -> str:
    """The error's type, with its SQLSTATE when it has one (`ReadOnlySqlTransaction/25006`)."""
    state = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__}/{state}" if isinstance(state, str) else type(exc).__name__
