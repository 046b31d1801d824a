"""What the crash, outage and multi-instance tests share: load, an audit, the invariants.

- `Load`: a steady stream of requests from the orchestrator (new bookings, some declined
  at the gateway, redeliveries of earlier records, re-requests with a new `ce_id`), each
  sent until the broker acknowledges it.
- `audit()`: after a run, everything that can be checked from the outside: every record
  on the out topics (read again from the beginning, with broker timestamps), the
  service's tables, the gateway's ledger.
- `Audit.violations()`: contract 4.1, 4.3 and 4.7 as checks over that audit: one
  terminal outcome per request, no booking charged twice, outcome = gateway ledger,
  contiguous stream versions, outbox published, nothing in flight, per-payment order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from support.broker import client_fetch_max_wait_ms
from support.fake_stripe import DECLINING_METHODS, FakeStripe

from .harness import (
    TERMINAL_KINDS,
    Kind,
    Orchestrator,
    Sent,
    ServiceExited,
    ServiceProcess,
    ServiceStack,
    ServiceTopics,
    led_partitions,
)

# -- the set-up shared by the chaos and multi-instance tests ---------------------------

# One seed for the load, the kills and the gateway's lost answers: CHAOS_SEED replays a run.
SEED = int(os.environ.get("CHAOS_SEED", str(random.SystemRandom().randrange(10**6))))
RECONCILE_AFTER_S = 2.0


def chaos_env(*, db_pool_max: int) -> dict[str, str]:
    """Test-friendly timings (issue 6): stale payments are reconciled after 2 s."""
    return {
        "PAYMENT_RECONCILE_AFTER_S": str(RECONCILE_AFTER_S),
        "PAYMENT_RECONCILE_INTERVAL_S": "1",
        "PAYMENT_PROCESSOR_TIMEOUT_MS": "5000",
        "PAYMENT_DB_POOL_MAX": str(db_pool_max),
        "PAYMENT_LOG_LEVEL": "WARNING",
    }


def run_length(name: str, default: int) -> int:
    """A length knob of a chaos run (`CHAOS_KILLS`...): the environment's value, `default`
    unless set. In CI (CI=true) a value under the default fails the run instead of quietly
    making it shorter than what its docstring promises."""
    value = int(os.environ.get(name, str(default)))
    if value < default and os.environ.get("CI") == "true":
        raise pytest.UsageError(f"{name}={value} is under the floor of {default} in CI")
    return value


def assert_exercised(summary: dict[str, int], *, lost_answers: bool) -> None:
    """The run did what it is meant to test, so that its invariants say something: bookings
    were processed to an outcome, the gateway charged, and (with a gateway that loses
    answers) some answers were lost, so the reconciler had unknown outcomes to resolve."""
    assert summary["bookings"] > 0, "no booking was sent"
    assert summary["payments"] > 0, "no payment was recorded"
    assert summary["terminal events (distinct ce_id)"] > 0, "no payment reached an outcome"
    assert summary["gateway charges (succeeded intents)"] > 0, "the gateway charged nothing"
    if lost_answers:
        assert summary["gateway lost responses"] > 0, "no answer was lost: reconciler untried"


def flaky_gateway() -> FakeStripe:
    """The Stripe-shaped gateway of the chaos tests: 2-30 ms per call, 3 % answers lost."""
    return FakeStripe(latency_ms=(2, 30), lose_response_rate=0.03, seed=SEED)


async def ready_or_exited(service: ServiceProcess, timeout_s: float = 60.0) -> bool:
    """True once ready, False if the process ended first (a failpoint during start-up)."""
    try:
        await service.wait_ready(timeout_s)
    except ServiceExited:
        if service.running:
            raise  # not ready in time: a real problem, not the failpoint
        return False
    return True


APPROVING_METHOD = "pm_card_visa"
DECLINING_METHOD = next(iter(DECLINING_METHODS))


# -- load --------------------------------------------------------------------------------


@dataclass
class Load:
    """Requests at `rate_per_s` until stopped: what an orchestrator under traffic sends.

    Of the sends, `redeliver_share` repeat an earlier record exactly (same `ce_id`: a
    redelivery, contract 4.2), `rerequest_share` ask again for an earlier booking with a
    new `ce_id` (contract 4.3); the rest are new bookings, `decline_share` of them with a
    payment method the gateway declines. A send is retried until acknowledged (the broker
    may be away), with the same `ce_id`, as an orchestrator would.
    """

    orch: Orchestrator
    rate_per_s: float = 5.0
    decline_share: float = 0.15
    redeliver_share: float = 0.05
    rerequest_share: float = 0.05
    prefix: str = "chaos"
    seed: int = 0
    requests: list[Sent] = field(default_factory=list)
    # booking id -> the payment method it was requested with
    bookings: dict[str, str] = field(default_factory=dict)
    send_retries: int = 0
    kinds: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="load")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.rate_per_s
        due = loop.time()
        while not self._stop.is_set():
            await self.send_one()
            due = max(due + interval, loop.time() - 1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, due - loop.time()))

    async def send_one(self) -> Sent:
        draw = self._random.random()
        if draw < self.redeliver_share and self.requests:
            earlier = self._random.choice(self.requests)
            self.kinds["redelivery"] += 1
            return await self._retrying(lambda: self.orch.redeliver(earlier))
        if draw < self.redeliver_share + self.rerequest_share and self.bookings:
            booking = self._random.choice(list(self.bookings))
            method = self.bookings[booking]
            self.kinds["rerequest"] += 1
            ce_id = str(uuid.uuid4())
            return await self._retrying(
                lambda: self.orch.request(booking, payment_method=method, ce_id=ce_id)
            )
        booking = f"{self.prefix}-{uuid.uuid4().hex[:12]}"
        declined = self._random.random() < self.decline_share
        method = DECLINING_METHOD if declined else APPROVING_METHOD
        self.bookings[booking] = method
        self.kinds["new"] += 1
        ce_id = str(uuid.uuid4())
        return await self._retrying(
            lambda: self.orch.request(booking, payment_method=method, ce_id=ce_id)
        )

    async def _retrying(self, send: Callable[[], Any]) -> Sent:
        delay = 0.2
        while True:
            try:
                async with asyncio.timeout(15):
                    sent: Sent = await send()
                break
            except Exception:  # any broker trouble: the orchestrator sends again
                self.send_retries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.requests.append(sent)
        return sent


# -- the audit ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One record of an out topic, with what the checks need."""

    kind: Kind
    partition: int
    offset: int
    timestamp: int
    key: str | None
    ce_id: str | None
    sequence: int | None
    data: Any


async def read_topics(
    bootstrap: str, topics: ServiceTopics, timeout_s: float = 60.0
) -> list[Record]:
    """Every record now on the out topics, from the beginning (a fresh, group-less reader)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=client_fetch_max_wait_ms(),
    )
    await consumer.start()
    try:
        led = await led_partitions(bootstrap, list(topics.outbound), 10.0)
        partitions = [
            TopicPartition(topic, p) for topic in topics.outbound for p in sorted(led[topic])
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: list[Record] = []
        deadline = time.monotonic() + timeout_s
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise TimeoutError("could not read the out topics to their end")
            batch = await consumer.getmany(timeout_ms=200)
            for tp, found in batch.items():
                kind = topics.outbound[tp.topic]
                for r in found:
                    headers = {k: (v or b"").decode("utf-8", "replace") for k, v in r.headers}
                    data: Any = None
                    if kind != "dead_letter" and r.value is not None:
                        with contextlib.suppress(ValueError):
                            data = json.loads(r.value)
                    sequence = headers.get("ce_sequence")
                    records.append(
                        Record(
                            kind=kind,
                            partition=r.partition,
                            offset=r.offset,
                            timestamp=r.timestamp,
                            key=None if r.key is None else r.key.decode("utf-8", "replace"),
                            ce_id=headers.get("ce_id"),
                            sequence=int(sequence) if sequence and sequence.isdigit() else None,
                            data=data,
                        )
                    )
        return records
    finally:
        await consumer.stop()


@dataclass
class DatabaseState:
    payments: dict[str, tuple[str, str]]  # payment id -> (booking id, status)
    streams: dict[str, list[tuple[int, str, str, dict[str, Any]]]]  # id -> (v, type, eid, data)
    unpublished: int
    in_flight_stale: int
    outbox_rows: int

    @classmethod
    async def read(cls, url: str, *, stale_after_s: float) -> DatabaseState:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            payments = {
                str(pid): (booking, status)
                for pid, booking, status in await (
                    await conn.execute(
                        "SELECT payment_id, booking_id, status FROM payment_payments"
                    )
                ).fetchall()
            }
            streams: dict[str, list[tuple[int, str, str, dict[str, Any]]]] = defaultdict(list)
            for sid, version, etype, eid, data in await (
                await conn.execute(
                    "SELECT stream_id, version, event_type, event_id, data FROM payment_events"
                    " ORDER BY stream_id, version"
                )
            ).fetchall():
                streams[str(sid)].append((version, etype, str(eid), data))
            row = await (
                await conn.execute(
                    "SELECT count(*) FILTER (WHERE published_at IS NULL), count(*)"
                    " FROM payment_outbox"
                )
            ).fetchone()
            assert row is not None
            unpublished, outbox_rows = row
            stale = await (
                await conn.execute(
                    "SELECT count(*) FROM payment_payments WHERE status = 'INITIATED'"
                    " AND updated_at < now() - make_interval(secs => %s)",
                    (stale_after_s,),
                )
            ).fetchone()
            assert stale is not None
        return cls(
            payments=payments,
            streams=dict(streams),
            unpublished=unpublished,
            in_flight_stale=stale[0],
            outbox_rows=outbox_rows,
        )


async def wait_until_quiet(
    url: str, *, timeout_s: float, check_every_s: float = 0.5
) -> tuple[int, int]:
    """Until no payment is in flight and no outbox row is unpublished; returns the last
    (in flight, unpublished) counts, which are (0, 0) unless the time ran out."""
    deadline = time.monotonic() + timeout_s
    counts = (-1, -1)
    while time.monotonic() < deadline:
        with contextlib.suppress(psycopg.OperationalError):
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                row = await (
                    await conn.execute(
                        "SELECT (SELECT count(*) FROM payment_payments"
                        "        WHERE status = 'INITIATED'),"
                        "       (SELECT count(*) FROM payment_outbox WHERE published_at IS NULL)"
                    )
                ).fetchone()
            assert row is not None
            counts = (row[0], row[1])
            if counts == (0, 0):
                return counts
        await asyncio.sleep(check_every_s)
    return counts


async def explain(url: str, bookings: Iterable[str], gateway_log: str = "") -> str:
    """The stored stream of each booking's payment and the gateway's lines about it."""
    lines: list[str] = []
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for booking in bookings:
            row = await (
                await conn.execute(
                    "SELECT payment_id, status FROM payment_payments WHERE booking_id = %s",
                    (booking,),
                )
            ).fetchone()
            if row is None:
                lines.append(f"{booking}: no payment")
                continue
            lines.append(f"{booking}: payment {row[0]} {row[1]}")
            for version, etype, data in await (
                await conn.execute(
                    "SELECT version, event_type, data FROM payment_events WHERE stream_id = %s"
                    " ORDER BY version",
                    (row[0],),
                )
            ).fetchall():
                detail = data.get("detail") or data.get("result") or ""
                lines.append(f"    v{version} {etype} {detail}")
            lines += [f"    gateway: {g}" for g in gateway_log.splitlines() if str(row[0]) in g]
    return "\n".join(lines)


@dataclass
class Audit:
    """Topics, tables and gateway after a run, and the bookings the load asked for."""

    bookings: dict[str, str]
    requests: int
    records: list[Record]
    db: DatabaseState
    intents: list[dict[str, Any]]
    gateway_stats: dict[str, int]
    # Bookings whose outcome may be missing from the topics for a reason outside the
    # service (a memory-only broker restarted): checked in the database instead.
    excused: set[str] = field(default_factory=set)

    # -- derived -----------------------------------------------------------------------

    def distinct(self, *kinds: Kind) -> dict[str, list[Record]]:
        """booking id -> first delivery of each distinct ce_id of these kinds."""
        by_booking: dict[str, dict[str, Record]] = defaultdict(dict)
        for r in self.records:
            if r.kind in kinds and r.ce_id is not None and isinstance(r.data, dict):
                booking = r.data.get("booking_id")
                if isinstance(booking, str):
                    by_booking[booking].setdefault(r.ce_id, r)
        return {b: list(found.values()) for b, found in by_booking.items()}

    def charges_by_booking(self) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for intent in self.intents:
            if intent["status"] == "succeeded":
                found[intent["metadata"].get("booking_id", "?")].append(intent)
        return found

    def double_charged(self) -> dict[str, int]:
        return {b: len(c) for b, c in self.charges_by_booking().items() if len(c) > 1}

    def lost(self) -> list[str]:
        """Bookings asked for without exactly one outcome on the topics (or, excused, in
        the database)."""
        terminal = self.distinct(*TERMINAL_KINDS)
        by_booking = {booking: status for booking, status in self.db.payments.values()}
        missing = []
        for booking in self.bookings:
            if len(terminal.get(booking, [])) == 1:
                continue
            if booking in self.excused and by_booking.get(booking) in ("COMPLETED", "FAILED"):
                continue
            missing.append(booking)
        return missing

    # -- the invariants ----------------------------------------------------------------

    def violations(self, *, order: bool = True) -> list[str]:
        """Every broken invariant, described; `order=False` skips the per-payment order
        (when `records` carry no broker timestamps)."""
        found: list[str] = []
        terminal = self.distinct(*TERMINAL_KINDS)
        initiated = self.distinct("initiated")
        payment_of = {booking: pid for pid, (booking, _) in self.db.payments.items()}
        intents_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for intent in self.intents:
            intents_of[intent["metadata"].get("payment_id", "?")].append(intent)

        # Contract 4.1 / 4.7: one payment, one initiated, one outcome per booking.
        for booking, method in self.bookings.items():
            outcomes = terminal.get(booking, [])
            if len(outcomes) != 1 and booking not in self.excused:
                found.append(f"{booking}: {len(outcomes)} distinct terminal events")
            if len(initiated.get(booking, [])) > 1:
                found.append(f"{booking}: {len(initiated[booking])} distinct initiated events")
            pid = payment_of.get(booking)
            if pid is None:
                found.append(f"{booking}: no payment in the database")
                continue
            stream = self.db.streams.get(pid, [])
            final = stream[-1] if stream else None
            if final is None or final[1] not in ("PaymentCompleted", "PaymentFailed"):
                found.append(f"{booking}: stream of {pid} does not end in an outcome")
                continue
            for record in outcomes:
                if record.ce_id != final[2] or record.sequence != final[0]:
                    found.append(
                        f"{booking}: published outcome {record.ce_id}@{record.sequence} is not"
                        f" the stored one {final[2]}@{final[0]}"
                    )
            # The gateway's ledger decides what the outcome must be.
            charged = [i for i in intents_of.get(pid, []) if i["status"] == "succeeded"]
            declined = [i for i in intents_of.get(pid, []) if i["status"] != "succeeded"]
            if final[1] == "PaymentCompleted":
                reference = final[3].get("provider_reference")
                if [i["id"] for i in charged] != [reference]:
                    found.append(
                        f"{booking}: completed with {reference}, gateway charges"
                        f" {[i['id'] for i in charged]}"
                    )
            else:
                reason = final[3].get("reason")
                if charged:
                    found.append(f"{booking}: failed ({reason}) but charged {len(charged)}x")
                if reason == "declined" and not declined:
                    found.append(f"{booking}: declined without a declined attempt at the gateway")
            expected = "PaymentFailed" if method == DECLINING_METHOD else "PaymentCompleted"
            if final[1] != expected:
                found.append(
                    f"{booking}: {final[1]} ({final[3].get('reason')}), expected {expected}"
                )

        # No booking charged twice, no charge for a payment the service does not know.
        for booking, count in self.double_charged().items():
            found.append(f"{booking}: charged {count} times at the gateway")
        for pid in intents_of:
            if pid not in self.db.payments:
                found.append(f"gateway charge for unknown payment {pid}")
        if len(payment_of) != len(self.db.payments):
            found.append("two payments for one booking in the database")

        # Streams: versions 1..n, one outcome at most, the outbox published, none in flight.
        for pid, stream in self.db.streams.items():
            versions = [v for v, *_ in stream]
            if versions != list(range(1, len(versions) + 1)):
                found.append(f"stream {pid}: versions {versions}")
            outcomes = [t for _, t, *_ in stream if t in ("PaymentCompleted", "PaymentFailed")]
            if len(outcomes) > 1:
                found.append(f"stream {pid}: {len(outcomes)} outcomes")
        if self.db.unpublished:
            found.append(f"{self.db.unpublished} outbox rows unpublished")
        if self.db.in_flight_stale:
            found.append(f"{self.db.in_flight_stale} payments in flight past the threshold")

        # Per payment, on the topics: the first copy of each event in stream order.
        if order:
            found += self.order_violations()
        dead = [r for r in self.records if r.kind == "dead_letter"]
        if dead:
            found.append(f"{len(dead)} dead letters")
        return found

    def order_violations(self) -> list[str]:
        """ce_sequence never goes down along a payment's first deliveries (by broker time),
        and the initiated event (version 1) comes first."""
        found = []
        first: dict[str, dict[str, Record]] = defaultdict(dict)
        for r in self.records:
            if r.kind != "dead_letter" and r.key is not None and r.ce_id is not None:
                first[r.key].setdefault(r.ce_id, r)
        for key, events in first.items():
            ordered = sorted(events.values(), key=lambda r: (r.timestamp, r.sequence or 0))
            sequences = [r.sequence or 0 for r in ordered]
            if sequences != sorted(sequences) or (sequences and sequences[0] != 1):
                found.append(f"payment {key}: sequences in publication order {sequences}")
        return found

    def summary(self) -> dict[str, int]:
        terminal_records = [r for r in self.records if r.kind in TERMINAL_KINDS]
        charged = [i for i in self.intents if i["status"] == "succeeded"]
        counters = {}
        if self.gateway_stats:  # the fake gateway counts; localstripe does not
            counters = {
                "gateway create calls": self.gateway_stats.get("create_requests", 0),
                "gateway idempotent replays": self.gateway_stats.get("replayed", 0),
                "gateway lost responses": self.gateway_stats.get("lost_responses", 0),
            }
        return {
            "requests sent": self.requests,
            "bookings": len(self.bookings),
            "payments": len(self.db.payments),
            "gateway charges (succeeded intents)": len(charged),
            "gateway declines": len(self.intents) - len(charged),
            **counters,
            "terminal events (deliveries)": len(terminal_records),
            "terminal events (distinct ce_id)": len({r.ce_id for r in terminal_records}),
            "initiated events (deliveries)": sum(r.kind == "initiated" for r in self.records),
            "lost requests": len(self.lost()),
            "double charges": len(self.double_charged()),
        }


def format_summary(title: str, rows: Iterable[tuple[str, object]]) -> str:
    lines = [f"== {title} =="]
    lines += [f"  {name:<40} {value}" for name, value in rows]
    return "\n".join(lines)


async def settle(stack: ServiceStack, load: Load, gateway: FakeStripe, timeout_s: float) -> None:
    """Until every booking of `load` has an outcome and nothing is left to publish or
    resolve; else what the database and the gateway say of the missing ones."""
    bookings = list(load.bookings)
    try:
        await stack.orch.wait_all_terminal(bookings, timeout_s=timeout_s)
    except AssertionError:
        missing = [b for b in bookings if not stack.orch.events.terminal(b)]
        detail = await explain(stack.database_url, missing[:10], gateway.log_text())
        raise AssertionError(
            f"{len(missing)} bookings without an outcome:\n{detail}\n{stack.diagnostics()}"
        ) from None
    assert await wait_until_quiet(stack.database_url, timeout_s=60) == (0, 0)
