"""Time per span (wall clock on an idle loop, close to its CPU cost): the SDK's span against
the propagating span the service uses by default.

Each iteration starts a CONSUMER span as the current span under a remote parent (as the
consumer does for every message), sets one attribute and ends it. The SDK provider has
no span processor: what a span costs before any exporter. Alternating rounds, same run.

    .venv/bin/python bench/spans.py --spans 50000 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Tracer

from payment.adapters.observability.telemetry import PropagatingTracer, context_from_trace
from payment.application.commands import TraceHeaders

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def per_span(tracer: Tracer, count: int) -> float:
    parent = context_from_trace(TraceHeaders(traceparent=TRACEPARENT))
    attributes = {"messaging.system": "kafka", "messaging.destination.name": "topic"}
    started = time.perf_counter()
    for _ in range(count):
        with tracer.start_as_current_span(
            "process", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        ) as span:
            span.set_attribute("payment.id", "3f2c5a1e-0000-4000-8000-000000000000")
    return (time.perf_counter() - started) / count


def main(count: int, rounds: int) -> None:
    sdk_tracer = TracerProvider().get_tracer("bench")
    propagating = PropagatingTracer()
    sdk: list[float] = []
    light: list[float] = []
    for _ in range(rounds):
        sdk.append(per_span(sdk_tracer, count))
        light.append(per_span(propagating, count))
    sdk_us = statistics.median(sdk) * 1e6
    light_us = statistics.median(light) * 1e6
    print(f"spans per round: {count}, rounds: {rounds} (medians)")
    print(f"SDK span, no processor:    {sdk_us:6.1f} us")
    print(f"propagating span (default): {light_us:5.1f} us")
    print(f"ratio SDK / propagating:   {sdk_us / light_us:6.1f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    main(args.spans, args.rounds)
