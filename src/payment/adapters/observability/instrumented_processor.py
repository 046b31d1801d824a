"""Spans, metrics and log lines around any PaymentProcessor: `InstrumentedProcessor`.

A decorator the composition root wraps around the real gateway adapter (fake, Stripe), so
the application layer stays free of OpenTelemetry: a CLIENT span per gateway call, its
latency and its errors, and one log line per call (within the log budget).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, TypeVar

from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from payment.adapters.observability.log_budget import UNLIMITED, LogBudget
from payment.adapters.observability.metrics import Metrics
from payment.adapters.observability.span_attributes import (
    ATTR_BOOKING_ID,
    ATTR_DECLINE_CODE,
    ATTR_ERROR_TYPE,
    ATTR_OPERATION,
    ATTR_OUTCOME,
    ATTR_PAYMENT_ID,
    ATTR_PROCESSOR,
    ATTR_REFUND_ID,
)
from payment.domain.processor import (
    Approved,
    ChargeRequest,
    Declined,
    OutcomeUnknown,
    ProcessorUnavailable,
    RefundDeclined,
    Refunded,
    RefundRequest,
)

if TYPE_CHECKING:
    from payment.domain.processor import ChargeOutcome, PaymentProcessor, RefundOutcome

log = logging.getLogger("payment.lifecycle")

_T = TypeVar("_T")
_Req = TypeVar("_Req", ChargeRequest, RefundRequest)

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
        started = time.perf_counter()
        result = "error"
        with self._tracer.start_as_current_span(
            f"{self.name} {operation}",
            kind=SpanKind.CLIENT,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            if span.is_recording():  # (the attributes cost more than a span that does not)
                ids = _ids_of(request)
                span.set_attributes(
                    {
                        ATTR_PAYMENT_ID: ids["payment_id"],
                        ATTR_BOOKING_ID: request.booking_id,
                        ATTR_PROCESSOR: self.name,
                        ATTR_OPERATION: operation,
                        **({ATTR_REFUND_ID: ids["refund_id"]} if "refund_id" in ids else {}),
                    }
                )
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
                    span.set_attribute(ATTR_DECLINE_CODE, outcome.code)
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
                        extra={**_ids_of(request), "processor": self.name, "result": result},
                    )
                elif self._budget.allow(f"processor {operation}"):
                    log.info(
                        "processor %s %s: %s",
                        self.name,
                        operation,
                        result,
                        extra={**_ids_of(request), "processor": self.name, "result": result},
                    )


def _ids_of(request: ChargeRequest | RefundRequest) -> dict[str, str]:
    """What a call is about, for its span and log lines."""
    ids = {"payment_id": str(request.payment_id), "booking_id": request.booking_id}
    if isinstance(request, RefundRequest):
        ids["refund_id"] = str(request.refund_id)
    return ids


def _result_of(outcome: object) -> str:
    if isinstance(outcome, Approved):
        return "approved"
    if isinstance(outcome, Declined | RefundDeclined):
        return "declined"
    if isinstance(outcome, Refunded):
        return "refunded"
    return "not_found" if outcome is None else type(outcome).__name__.lower()
