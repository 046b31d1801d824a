"""The demo orchestrator: plays the booking SAGA against a running service over Kafka."""

from __future__ import annotations

import asyncio
import math
import random
import secrets
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Literal, TextIO

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from payment.adapters.kafka.cloudevents import (
    CONTENT_TYPE,
    H_CONTENT_TYPE,
    H_ID,
    H_SOURCE,
    H_SPECVERSION,
    H_TIME,
    H_TRACEPARENT,
    H_TYPE,
    SPECVERSION,
    format_time,
)
from payment.adapters.kafka.producer import create_producer
from payment.adapters.kafka.security import KafkaSecurity, client_security
from payment.adapters.kafka.topics import Topics
from payment.application.messages import REQUEST_PAYMENT, RequestPaymentMessage

__all__ = ["DemoReport", "run_demo"]

# Different exponents on purpose (2, 0, 3): the service must not assume cents.
CURRENCIES: Final = ("EUR", "USD", "GBP", "JPY", "CHF", "SEK", "KWD")
PAYMENT_METHODS: Final = ("pm_card_visa", "pm_card_mastercard", "pm_card_amex")
DUPLICATES: Final = 4
POISON_VALUE: Final = b"{this is not JSON"
# How long to keep listening once everything expected arrived: a duplicate that was
# not ignored shows up as an extra delivery, and only if we are still listening.
SETTLE_S: Final = 1.0
_POLL_MS: Final = 100
# Tansu answers a fetch only when this expires; a real Kafka answers as data arrives.
_FETCH_MAX_WAIT_MS: Final = 5
_BAR_WIDTH: Final = 30

_Kind = Literal["request", "invalid", "poison"]


class DemoReport(msgspec.Struct, frozen=True, kw_only=True):
    """What a demo run saw; `ok` says whether the service kept the contract (section 4).

    Counts are per booking after deduplication by (`ce_source`, `ce_id`). Latencies run
    from sending a request to receiving its first terminal event.
    """

    run_id: str
    requests_sent: int
    completed: int
    failed_by_reason: dict[str, int]
    no_outcome: int
    conflicting_outcomes: int
    missing_initiated: int
    duplicates_sent: int
    duplicates_ignored: int
    rerequest_sent: bool
    rerequest_replayed: bool
    invalid_rejected: bool | None
    poison_dead_lettered: bool | None
    dead_letters: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    outcomes_s: float
    payments_per_s: float | None
    elapsed_s: float
    timed_out: bool
    problems: tuple[str, ...]
    ok: bool


class _OutcomeData(msgspec.Struct, kw_only=True):
    """The part of an outbound event the orchestrator reads (tolerant reader)."""

    booking_id: str
    reason: str | None = None


_outcome_decoder = msgspec.json.Decoder(_OutcomeData)
_encoder = msgspec.json.Encoder()


@dataclass
class _Booking:
    booking_id: str
    kind: _Kind
    value: bytes
    headers: list[tuple[str, bytes]]
    duplicate: Literal["immediate", "late"] | None = None
    sent_at: float | None = None
    initiated: set[str] = field(default_factory=set)
    initiated_deliveries: int = 0
    # ce_id -> "completed" or the failure reason
    terminal: dict[str, str] = field(default_factory=dict)
    terminal_deliveries: int = 0
    expected_terminal_deliveries: int = 1
    first_terminal_at: float | None = None
    dead_letters: set[str] = field(default_factory=set)
    followed_up: bool = False

    @property
    def outcome(self) -> str | None:
        return next(iter(self.terminal.values())) if len(self.terminal) == 1 else None


class _Run:
    """The bookings of one run and everything received about them."""

    def __init__(self, run_id: str, count: int, source: str, extras: bool) -> None:
        self.run_id = run_id
        self.source = source
        self.prefix = f"demo-{run_id}-"
        rng = random.Random(run_id)
        self.requests = [
            self._booking(
                f"{self.prefix}{i}",
                "request",
                RequestPaymentMessage(
                    booking_id=f"{self.prefix}{i}",
                    amount=rng.randint(100, 250_000),
                    currency=CURRENCIES[i % len(CURRENCIES)],
                    payment_method=PAYMENT_METHODS[i % len(PAYMENT_METHODS)],
                    customer_id=f"cus_demo_{rng.randrange(50)}",
                    saga_id=f"saga-{run_id}-{i}",
                ),
            )
            for i in range(count)
        ]
        self.extras: list[_Booking] = []
        self.invalid: _Booking | None = None
        self.poison: _Booking | None = None
        self.duplicates: list[_Booking] = []
        if extras:
            self.invalid = self._booking(
                f"{self.prefix}invalid",
                "invalid",
                RequestPaymentMessage(
                    booking_id=f"{self.prefix}invalid",
                    amount=0,
                    currency="EUR",
                    payment_method="pm_card_visa",
                    saga_id=f"saga-{run_id}-invalid",
                ),
            )
            poison_id = f"{self.prefix}poison"
            self.poison = _Booking(
                poison_id, "poison", POISON_VALUE, self._headers(), expected_terminal_deliveries=0
            )
            self.extras = [self.invalid, self.poison]
            # The first requests are sent first, so their outcomes come early and the
            # late duplicates do not hold the run up.
            self.duplicates = self.requests[:DUPLICATES]
            for i, booking in enumerate(self.duplicates):
                booking.duplicate = "immediate" if i % 2 == 0 else "late"
        self.by_id = {b.booking_id: b for b in (*self.requests, *self.extras)}
        # Only those actually sent: a late duplicate waits for an outcome that may not come.
        self.duplicates_sent: list[_Booking] = []
        self.rerequest: _Booking | None = None
        self.pending_sends = 0
        self.last_send_at: float | None = None
        self.seen: set[tuple[str, str, str]] = set()
        self.malformed = 0
        self.foreign_dead_letters = 0

    def _booking(self, booking_id: str, kind: _Kind, message: RequestPaymentMessage) -> _Booking:
        return _Booking(booking_id, kind, _encoder.encode(message), self._headers())

    def _headers(self) -> list[tuple[str, bytes]]:
        # A trace per booking, so the service's spans of one request can be found.
        trace = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
        return [
            (H_SPECVERSION, SPECVERSION.encode()),
            (H_ID, str(uuid.uuid4()).encode()),
            (H_SOURCE, self.source.encode()),
            (H_TYPE, REQUEST_PAYMENT.encode()),
            (H_TIME, format_time(datetime.now(UTC)).encode()),
            (H_CONTENT_TYPE, CONTENT_TYPE.encode()),
            (H_TRACEPARENT, trace.encode()),
        ]

    # -- receiving ---------------------------------------------------------------------

    def receive(self, record: ConsumerRecord[bytes, bytes], topics: Topics, now: float) -> None:
        headers = _header_map(record.headers)
        ce_id, ce_source = headers.get(H_ID), headers.get(H_SOURCE)
        if record.topic == topics.dead_letter:
            self._dead_letter(record, ce_source, ce_id)
            return
        try:
            data = _outcome_decoder.decode(record.value or b"")
        except msgspec.DecodeError:
            # Cannot be attributed to a booking, but the service published it: a bug.
            self.malformed += 1
            return
        booking = self.by_id.get(data.booking_id)
        if booking is None:
            return  # another run's, or another orchestrator's
        if ce_id is None or ce_source is None:
            self.malformed += 1
            return
        key = (record.topic, ce_source, ce_id)
        first = key not in self.seen
        self.seen.add(key)
        if record.topic == topics.initiated:
            booking.initiated_deliveries += 1
            booking.initiated.add(ce_id)
        elif record.topic in (topics.completed, topics.failed):
            booking.terminal_deliveries += 1
            if first:
                outcome = "completed" if record.topic == topics.completed else data.reason
                booking.terminal[ce_id] = outcome or "unknown"
            if booking.first_terminal_at is None:
                booking.first_terminal_at = now

    def _dead_letter(
        self, record: ConsumerRecord[bytes, bytes], ce_source: str | None, ce_id: str | None
    ) -> None:
        # A dead letter keeps the original key and headers: that is how it is matched.
        key = (record.key or b"").decode("utf-8", "replace")
        booking = self.by_id.get(key)
        if booking is None:
            if key.startswith(self.prefix):
                self.foreign_dead_letters += 1
            return
        booking.dead_letters.add(f"{ce_source}/{ce_id}")

    # -- progress ----------------------------------------------------------------------

    def answered(self) -> int:
        return sum(1 for b in self.requests if b.terminal)

    def complete(self) -> bool:
        """Everything expected has arrived (the settle period is the caller's)."""
        if self.answered() < len(self.requests) or self.pending_sends:
            return False
        if self.invalid is not None and not self.invalid.terminal:
            return False
        if self.poison is not None and not self.poison.dead_letters:
            return False
        if any(b.duplicate == "late" and not b.followed_up for b in self.duplicates):
            return False
        if self.rerequest is None:
            return not self.extras
        return self.rerequest.terminal_deliveries >= self.rerequest.expected_terminal_deliveries

    def follow_ups(self) -> list[tuple[_Booking, list[tuple[str, bytes]]]]:
        """Messages that wait for an outcome: late duplicates and the re-request."""
        due: list[tuple[_Booking, list[tuple[str, bytes]]]] = []
        for booking in self.duplicates:
            if booking.duplicate == "late" and booking.terminal and not booking.followed_up:
                booking.followed_up = True
                self.duplicates_sent.append(booking)
                due.append((booking, booking.headers))
        if self.extras and self.rerequest is None:
            # Prefer a booking no duplicate was sent for, so each check stays readable.
            answered = [b for b in self.requests if b.terminal]
            if any(b.duplicate is None for b in self.requests):
                candidates = [b for b in answered if b.duplicate is None]
            else:
                candidates = answered
            if candidates:
                self.rerequest = candidates[0]
                self.rerequest.expected_terminal_deliveries += 1
                due.append((self.rerequest, self._headers()))
        return due


def _header_map(headers: Sequence[tuple[str, bytes | None]] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for name, raw in headers or ():
        if raw is not None:
            result.setdefault(name.lower(), raw.decode("utf-8", "replace"))
    return result


def _percentile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


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
    run = _Run(uuid.uuid4().hex[:8], count, source, extras)
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
    report = _report(run, started, timed_out)
    _print_summary(report, stream)
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
    run: _Run,
    consumer: AIOKafkaConsumer,
    producer: AIOKafkaProducer,
    topics: Topics,
    deadline: float,
    out: TextIO,
    settle_s: float,
) -> bool:
    """Send, then consume until everything arrived and settled; False on timeout."""

    async def send(booking: _Booking, headers: list[tuple[str, bytes]]) -> None:
        try:
            if booking.sent_at is None:
                booking.sent_at = time.monotonic()
            await producer.send_and_wait(
                topics.request, booking.value, key=booking.booking_id.encode(), headers=headers
            )
        finally:
            run.pending_sends -= 1
            run.last_send_at = time.monotonic()

    def start_send(booking: _Booking, headers: list[tuple[str, bytes]]) -> asyncio.Task[None]:
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


def _report(run: _Run, started: float, timed_out: bool) -> DemoReport:
    problems: list[str] = []
    requests = run.requests
    completed = sum(1 for b in requests if b.outcome == "completed")
    failed = Counter(b.outcome for b in requests if b.outcome not in (None, "completed"))
    no_outcome = sum(1 for b in requests if not b.terminal)
    conflicting = sum(1 for b in requests if len(b.terminal) > 1)
    missing_initiated = sum(1 for b in requests if b.terminal and not b.initiated)
    if no_outcome:
        problems.append(f"{no_outcome} request(s) got no terminal event")
    if conflicting:
        problems.append(f"{conflicting} booking(s) got more than one distinct terminal event")
    if missing_initiated:
        problems.append(f"{missing_initiated} payment(s) ended without payment.initiated")
    if n := sum(1 for b in requests if len(b.initiated) > 1):
        problems.append(f"{n} booking(s) got more than one distinct payment.initiated")
    if n := sum(1 for b in requests if b.dead_letters):
        problems.append(f"{n} valid request(s) went to the dead-letter topic")
    if run.malformed:
        problems.append(f"{run.malformed} outbound event(s) without readable data or ce_id")

    # Ignored = no extra delivery: a redelivered request publishes nothing (4.2).
    ignored = sum(
        1
        for b in run.duplicates_sent
        if b.terminal_deliveries <= b.expected_terminal_deliveries and b.initiated_deliveries <= 1
    )
    if ignored < len(run.duplicates_sent):
        problems.append(
            f"{len(run.duplicates_sent) - ignored} of {len(run.duplicates_sent)} duplicate(s) "
            "got an extra event"
        )
    replayed = False
    if run.extras:
        target = run.rerequest
        replayed = (
            target is not None
            and len(target.terminal) == 1
            and target.terminal_deliveries >= target.expected_terminal_deliveries
        )
        if not replayed:
            problems.append("the re-request did not replay the outcome with its ce_id")

    invalid_rejected: bool | None = None
    if run.invalid is not None:
        invalid = run.invalid
        invalid_rejected = (
            list(invalid.terminal.values()) == ["invalid_request"]
            and not invalid.initiated
            and not invalid.dead_letters
        )
        if not invalid_rejected:
            problems.append("the invalid request was not answered by exactly one invalid_request")
    poison_dead_lettered: bool | None = None
    if run.poison is not None:
        poison = run.poison
        poison_dead_lettered = (
            len(poison.dead_letters) == 1 and not poison.terminal and not poison.initiated
        )
        if not poison_dead_lettered:
            problems.append("the poison message did not reach the dead-letter topic (once)")
    dead_letters = sum(len(b.dead_letters) for b in run.by_id.values()) + run.foreign_dead_letters
    if run.foreign_dead_letters:
        problems.append(f"{run.foreign_dead_letters} unexpected dead letter(s) of this run")
    if timed_out:
        problems.append("timed out")

    latencies = sorted(
        (b.first_terminal_at - b.sent_at) * 1000
        for b in requests
        if b.first_terminal_at is not None and b.sent_at is not None
    )
    sent_times = [b.sent_at for b in requests if b.sent_at is not None]
    answer_times = [b.first_terminal_at for b in requests if b.first_terminal_at is not None]
    outcomes_s = max(answer_times) - min(sent_times) if answer_times and sent_times else 0.0
    return DemoReport(
        run_id=run.run_id,
        requests_sent=sum(1 for b in requests if b.sent_at is not None),
        completed=completed,
        failed_by_reason={str(k): v for k, v in sorted(failed.items(), key=lambda kv: str(kv[0]))},
        no_outcome=no_outcome,
        conflicting_outcomes=conflicting,
        missing_initiated=missing_initiated,
        duplicates_sent=len(run.duplicates_sent),
        duplicates_ignored=ignored,
        rerequest_sent=run.rerequest is not None,
        rerequest_replayed=replayed,
        invalid_rejected=invalid_rejected,
        poison_dead_lettered=poison_dead_lettered,
        dead_letters=dead_letters,
        latency_p50_ms=_percentile(latencies, 50),
        latency_p95_ms=_percentile(latencies, 95),
        latency_p99_ms=_percentile(latencies, 99),
        outcomes_s=outcomes_s,
        payments_per_s=len(answer_times) / outcomes_s if outcomes_s > 0 else None,
        elapsed_s=time.monotonic() - started,
        timed_out=timed_out,
        problems=tuple(problems),
        ok=not problems,
    )


def _yes_no(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "NO")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _print_summary(report: DemoReport, out: TextIO) -> None:
    rows: list[tuple[str, str]] = [
        ("requests sent", str(report.requests_sent)),
        ("completed", str(report.completed)),
    ]
    rows += [(f"failed: {reason}", str(n)) for reason, n in report.failed_by_reason.items()]
    if not report.failed_by_reason:
        rows.append(("failed", "0"))
    rows.append(("no outcome", str(report.no_outcome)))
    rows.append(("more than one outcome", str(report.conflicting_outcomes)))
    if report.rerequest_sent or report.invalid_rejected is not None:
        rows += [
            (
                "duplicates sent / ignored",
                f"{report.duplicates_sent} / {report.duplicates_ignored}",
            ),
            ("re-request replayed, same ce_id", _yes_no(report.rerequest_replayed)),
            ("invalid request rejected", _yes_no(report.invalid_rejected)),
            (
                "dead letters (poison seen)",
                f"{report.dead_letters} ({_yes_no(report.poison_dead_lettered)})",
            ),
        ]
    rows += [
        (
            "latency p50 / p95 / p99 (ms)",
            f"{_ms(report.latency_p50_ms)} / {_ms(report.latency_p95_ms)} / "
            f"{_ms(report.latency_p99_ms)}",
        ),
        (
            "throughput (payments/s)",
            "-" if report.payments_per_s is None else f"{report.payments_per_s:.0f}",
        ),
        ("result", "OK" if report.ok else "FAILED"),
    ]
    label_width = max(len(label) for label, _ in rows)
    value_width = max(len(value) for _, value in rows)
    out.write(f"\ndemo run {report.run_id}: {report.elapsed_s:.2f} s\n")
    for label, value in rows:
        out.write(f"  {label:<{label_width}}  {value:>{value_width}}\n")
    for problem in report.problems:
        out.write(f"  ! {problem}\n")
    out.flush()
