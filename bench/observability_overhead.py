"""CPU cost of observability per payment: request + execute, bare and instrumented.

In-memory adapters and the fake processor, so nothing but the handlers is measured: the
difference is what the spans (SDK on, nothing exported, as by default), the metrics and
the lifecycle log lines (through the redacting handler, to /dev/null) add per payment.
Then the CPU of one Prometheus scrape (`GET /metrics` without HTTP: collect and render
every series), the cost the exposition format adds once per scrape interval.

    .venv/bin/python bench/observability_overhead.py --payments 5000
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
import uuid

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Tracer

from payment.adapters.memory import MemoryUnitOfWorkFactory, SystemClock
from payment.adapters.observability.instrumented import (
    InstrumentedProcessor,
    InstrumentedUnitOfWorkFactory,
)
from payment.adapters.observability.logs import configure_logging
from payment.adapters.observability.metrics import Metrics
from payment.adapters.observability.telemetry import context_from_trace
from payment.adapters.processors.fake import FakeProcessor
from payment.application.commands import ExecutePayment, InboundRef, RequestPayment, TraceHeaders
from payment.application.handlers import execute_payment, request_payment
from payment.application.ports import UnitOfWorkFactory
from payment.domain.processor import PaymentProcessor

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def payments(
    count: int,
    store: MemoryUnitOfWorkFactory,
    uows: UnitOfWorkFactory,
    processor: PaymentProcessor,
    tracer: Tracer | None,
) -> float:
    clock = SystemClock()
    started = time.perf_counter()
    for n in range(count):
        cmd = RequestPayment(
            inbound=InboundRef(source="bench", message_id=uuid.uuid4().hex),
            booking_id=f"bench-n{n}",
            amount=1999,
            currency="EUR",
            payment_method="pm_card_visa",
            trace=TraceHeaders(traceparent=TRACEPARENT),
        )
        if tracer is None:
            await request_payment(cmd, uows, clock)
        else:
            with tracer.start_as_current_span(
                "process request", context=context_from_trace(cmd.trace), kind=SpanKind.CONSUMER
            ):
                await request_payment(cmd, uows, clock)
        message = store.db.outbox[-1].message
        execute = ExecutePayment(
            inbound=InboundRef(source="self", message_id=str(message.event_id)),
            payment_id=uuid.UUID(message.key),
            trace=message.trace,
        )
        if tracer is None:
            await execute_payment(execute, uows, processor, clock)
        else:
            with tracer.start_as_current_span(
                "process initiated",
                context=context_from_trace(message.trace),
                kind=SpanKind.CONSUMER,
            ):
                await execute_payment(execute, uows, processor, clock)
    return (time.perf_counter() - started) / count


async def main(count: int, log_format: str, scrapes: int) -> None:
    with open(os.devnull, "w") as devnull:  # noqa: ASYNC230 (once, before timing)
        handler = configure_logging("INFO", log_format, stream=devnull)
        try:
            await compare(count, log_format, scrapes)
        finally:
            logging.getLogger().removeHandler(handler)


async def compare(count: int, log_format: str, scrapes: int) -> None:
    logging.getLogger("payment").setLevel(logging.INFO)

    store = MemoryUnitOfWorkFactory()
    bare = await payments(count, store, store, FakeProcessor(), None)

    store = MemoryUnitOfWorkFactory()
    tracer = TracerProvider().get_tracer("bench")
    metrics = Metrics()
    uows = InstrumentedUnitOfWorkFactory(store, tracer, metrics)
    processor = InstrumentedProcessor(FakeProcessor(), tracer, metrics)
    instrumented = await payments(count, store, uows, processor, tracer)

    print(f"payments: {count}, log format: {log_format}")
    print(f"bare:         {bare * 1e6:8.1f} us/payment")
    print(f"instrumented: {instrumented * 1e6:8.1f} us/payment (6 spans, 3 log lines)")
    print("              (the relay adds 2 spans and 2 log lines per payment, not measured)")
    print(f"overhead:     {(instrumented - bare) * 1e6:8.1f} us/payment")
    scrape, size = await scrape_cpu(metrics, scrapes)
    print(f"scrape:       {scrape * 1e6:8.1f} us CPU/scrape ({size} bytes, {scrapes} scrapes)")


async def scrape_cpu(metrics: Metrics, scrapes: int) -> tuple[float, int]:
    """CPU seconds of one render of every series, the mean of `scrapes` renders."""
    text = await metrics.render()  # warm: the first collection allocates the series
    started = time.process_time()
    for _ in range(scrapes):
        text = await metrics.render()
    return (time.process_time() - started) / scrapes, len(text.encode())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=5000)
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--scrapes", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.payments, args.log_format, args.scrapes))
