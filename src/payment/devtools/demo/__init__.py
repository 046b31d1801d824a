"""The demo orchestrator: plays the booking SAGA against a running service over Kafka."""

from __future__ import annotations

import asyncio
import math
import sys
import time
import uuid
from typing import Final, TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from payment.adapters.kafka.producer import create_producer
from payment.adapters.kafka.security import KafkaSecurity, client_security
from payment.adapters.kafka.topics import Topics
from payment.devtools.demo.bookings import Booking, Run
from payment.devtools.demo.report import DemoReport, build_report, print_summary

__all__ = ["DemoReport", "run_demo"]

# How long to keep listening once everything expected arrived: a duplicate that was
# not ignored shows up as an extra delivery, and only if we are still listening.
SETTLE_S: Final = 1.0
_POLL_MS: Final = 100
# Tansu answers a fetch only when this expires; a real Kafka answers as data arrives.
_FETCH_MAX_WAIT_MS: Final = 5
_BAR_WIDTH: Final = 30


class _Progress:
    """A live bar on a terminal (rewritten with \\r), periodic plain lines elsewhere."""

    def __init__(self, out: TextIO, total: int) -> None:
        self._out = out
        self._total = total
        self._tty = out.isatty()
        # A log file or CI output wants a line now and then, not ten per second.
        self._every = 0.1 if self._tty else 2.0
        self._last = -math.inf
        self._last_done = -1

    def update(self, done: int, elapsed: float, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self._every:
            return
        if force and not self._tty and done == self._last_done:
            return  # the closing line would repeat the last one
        self._last = now
        self._last_done = done
        share = done / self._total if self._total else 1.0
        if self._tty:
            filled = round(share * _BAR_WIDTH)
            bar = "#" * filled + "." * (_BAR_WIDTH - filled)
            self._out.write(
                f"\rdemo: [{bar}] {done}/{self._total} outcomes {share:4.0%} {elapsed:6.1f} s"
            )
        else:
            self._out.write(f"demo: {done}/{self._total} outcomes after {elapsed:.1f} s\n")
        self._out.flush()

    def finish(self, done: int, elapsed: float) -> None:
        self.update(done, elapsed, force=True)
        if self._tty:
            self._out.write("\n")
            self._out.flush()


async def run_demo(
    bootstrap_servers: str,
    *,
    count: int,
    topics: Topics,
    source: str = "demo-orchestrator",
    enable_idempotence: bool = False,
    timeout_s: float = 120,
    out: TextIO | None = None,
    extras: bool = True,
    settle_s: float = SETTLE_S,
    security: KafkaSecurity | None = None,
) -> DemoReport:
    """Play `count` booking requests against the service as the SAGA orchestrator would.

    With `extras` (the default) it also sends duplicates of a few requests (same
    `ce_source` + `ce_id`, some at once and some after the outcome), one re-request (new
    `ce_id`) of an answered booking, one invalid request (amount 0) and one message that
    is not JSON, and checks the contract's answer to each. It listens from the end
    offsets taken before sending, prints progress and a summary to `out` (standard error
    by default) and returns the report; the caller exits non-zero unless `report.ok`.

    Waits (within `timeout_s`) for the service's topics to exist rather than creating
    them: their partition count is the service's to choose. Raises aiokafka's
    `KafkaError` if the broker cannot be reached.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    stream = out if out is not None else sys.stderr
    run = Run(uuid.uuid4().hex[:8], count, source, extras)
    started = time.monotonic()
    deadline = started + timeout_s
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=_FETCH_MAX_WAIT_MS,
        client_id=f"{source}-{run.run_id}",
        **client_security(security),
    )
    producer = create_producer(
        bootstrap_servers,
        enable_idempotence=enable_idempotence,
        client_id=source,
        security=security,
    )
    await consumer.start()
    try:
        await producer.start()
        try:
            timed_out = not await _listen_from_end(consumer, producer, topics, deadline, stream)
            if timed_out:
                stream.write("demo: the service's topics did not appear in time\n")
            else:
                timed_out = not await _play(
                    run, consumer, producer, topics, deadline, stream, settle_s
                )
        finally:
            await producer.stop()
    finally:
        await consumer.stop()
    report = build_report(run, started, timed_out)
    print_summary(report, stream)
    return report


async def _listen_from_end(
    consumer: AIOKafkaConsumer,
    producer: AIOKafkaProducer,
    topics: Topics,
    deadline: float,
    out: TextIO,
) -> bool:
    """Assign every partition of the outbound topics at its end offset; False on timeout.

    Manual assignment rather than a consumer group: nothing to join or rebalance (slow
    on some brokers), and offsets taken before the first send cannot miss an answer.
    """
    wanted = (topics.initiated, topics.completed, topics.failed, topics.dead_letter)
    waiting_said = False
    partitions_of: dict[str, set[int]] = {}
    while True:
        existing = await consumer.topics()
        # The consumer's own metadata holds only topics it is assigned, so an unassigned
        # topic's partitions come from the producer, which fetches them on demand.
        for t in (*wanted, topics.request):
            if t in existing and not partitions_of.get(t):
                partitions_of[t] = set(await producer.partitions_for(t))
        missing = [t for t in (*wanted, topics.request) if not partitions_of.get(t)]
        if not missing:
            break
        if time.monotonic() >= deadline:
            return False
        if not waiting_said:
            out.write(f"demo: waiting for the service to create {', '.join(missing)}\n")
            out.flush()
            waiting_said = True
        await asyncio.sleep(0.2)
    partitions = [
        TopicPartition(topic, p) for topic in wanted for p in sorted(partitions_of[topic])
    ]
    consumer.assign(partitions)
    for tp, offset in (await consumer.end_offsets(partitions)).items():
        consumer.seek(tp, offset)
    return True


async def _play(
    run: Run,
    consumer: AIOKafkaConsumer,
    producer: AIOKafkaProducer,
    topics: Topics,
    deadline: float,
    out: TextIO,
    settle_s: float,
) -> bool:
    """Send, then consume until everything arrived and settled; False on timeout."""

    async def send(booking: Booking, headers: list[tuple[str, bytes]]) -> None:
        try:
            if booking.sent_at is None:
                booking.sent_at = time.monotonic()
            await producer.send_and_wait(
                topics.request, booking.value, key=booking.booking_id.encode(), headers=headers
            )
        finally:
            run.pending_sends -= 1
            run.last_send_at = time.monotonic()

    def start_send(booking: Booking, headers: list[tuple[str, bytes]]) -> asyncio.Task[None]:
        run.pending_sends += 1
        return asyncio.create_task(send(booking, headers))

    tasks: list[asyncio.Task[None]] = []
    first_send = time.monotonic()
    # Everything at once: the service sees a burst, as from a busy orchestrator.
    for booking in (*run.extras, *run.requests):
        tasks.append(start_send(booking, booking.headers))
        if booking.duplicate == "immediate":
            run.duplicates_sent.append(booking)
            tasks.append(start_send(booking, booking.headers))
    progress = _Progress(out, len(run.requests))
    settled_at: float | None = None
    try:
        while True:
            now = time.monotonic()
            for task in [t for t in tasks if t.done()]:
                task.result()  # a failed send is the broker's error: let it surface
                tasks.remove(task)
            progress.update(run.answered(), now - first_send)
            if run.complete():
                if settled_at is None:
                    settled_at = max(now, run.last_send_at or now) + settle_s
                if now >= settled_at:
                    return True
            if now >= deadline:
                return False
            batch = await consumer.getmany(timeout_ms=_POLL_MS)
            received = time.monotonic()
            for records in batch.values():
                for record in records:
                    run.receive(record, topics, received)
            for booking, headers in run.follow_ups():
                tasks.append(start_send(booking, headers))
    finally:
        progress.finish(run.answered(), time.monotonic() - first_send)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
