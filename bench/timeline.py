"""Where a payment's time goes: its stages, from timestamps the run left behind.

`bench/e2e.py --timeline` calls `stages` after its last step, before the database is
dropped. Each payment of the step is followed through the wall-clock times it left:

- the orchestrator's scheduled send and the request record's timestamp (set by the
  bench's producer when it queued the record);
- the events' `occurred_at` (the service's clock when the handler made them: after the
  record was fetched, dispatched and, for the outcome, after the gateway answered);
- the `payment.initiated` and outcome records' timestamps (set by the service's producer
  when the relay queued them: after the commit, the NOTIFY and the relay's read);
- the outbox rows' `published_at` (the relay's clock when the broker's acks came back);
- the orchestrator's receipt of the outcome.

Every stage is a difference of two of these on the one machine (one clock); timestamps
of Kafka records have millisecond resolution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import msgspec
import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from benchlib import percentile, table

from payment.adapters.kafka.topics import Topics


class _Booked(msgspec.Struct):
    booking_id: str | None = None


_decode_booked = msgspec.json.Decoder(_Booked).decode

_EVENTS = """
SELECT p.booking_id, e.event_type, e.occurred_at
FROM payment_payments p JOIN payment_events e ON e.stream_id = p.payment_id
WHERE p.booking_id = ANY(%s)
"""
_OUTBOX = """
SELECT p.booking_id, o.type, o.published_at
FROM payment_payments p JOIN payment_outbox o ON o.subject = p.payment_id::text
WHERE p.booking_id = ANY(%s)
"""

# stage | from mark | to mark: consecutive along one payment's path.
_STAGE_LINES = """
bench: scheduled -> request queued | scheduled | request_ts
request queued -> request handled | request_ts | PaymentInitiated
request handled -> initiated queued by relay | PaymentInitiated | initiated_ts
initiated queued -> acked and marked | initiated_ts | initiated_published
initiated queued -> execution handled | initiated_ts | ChargeStarted
ChargeStarted -> outcome made (commit + charge) | ChargeStarted | outcome
outcome made -> outcome queued by relay | outcome | outcome_ts
outcome queued -> bench received | outcome_ts | received
total: scheduled -> received | scheduled | received
"""
STAGES = [tuple(line.split(" | ")) for line in _STAGE_LINES.strip().splitlines()]


def _seconds(at: datetime) -> float:
    return at.timestamp()


async def _record_times(
    bootstrap: str, topics: Sequence[str], sizes: dict[str, list[int]]
) -> dict[tuple[str, str], float]:
    """(topic, booking) -> the first record's timestamp (s), reading each topic whole;
    `sizes[topic]` gets [records, key + value + header bytes]."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None
    )
    await consumer.start()
    found: dict[tuple[str, str], float] = {}
    try:
        partitions = [
            TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()
        ]
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = [
                TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()
            ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        remaining = {tp for tp in partitions if ends[tp] > 0}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000, max_records=10_000)
            for tp, records in batch.items():
                for record in records:
                    booking = (
                        record.key.decode()
                        if tp.topic == topics[0] and record.key
                        else _decode_booked(record.value or b"{}").booking_id
                    )
                    if booking is not None:
                        found.setdefault((tp.topic, booking), record.timestamp / 1000)
                    size = sizes.setdefault(tp.topic, [0, 0])
                    size[0] += 1
                    size[1] += (
                        max(record.serialized_key_size, 0)
                        + max(record.serialized_value_size, 0)
                        + sum(len(k) + len(v or b"") for k, v in record.headers)
                    )
                    if record.offset + 1 >= ends[tp]:
                        remaining.discard(tp)
    finally:
        await consumer.stop()
    return found


async def stages(
    db_url: str,
    bootstrap: str,
    topics: Topics,
    scheduled: Mapping[str, float],
    received: Mapping[str, float],
) -> str:
    """A table of the stages of the payments in `received` (booking -> wall-clock s)."""
    bookings = list(received)
    marks: dict[str, dict[str, float]] = {
        b: {"scheduled": scheduled[b], "received": received[b]} for b in bookings
    }
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        for booking, event_type, at in await (await conn.execute(_EVENTS, [bookings])).fetchall():
            if event_type in ("PaymentCompleted", "PaymentFailed"):
                event_type = "outcome"
            marks[booking].setdefault(event_type, _seconds(at))
        for booking, kind, at in await (await conn.execute(_OUTBOX, [bookings])).fetchall():
            if kind == "payment.initiated" and at is not None:
                marks[booking]["initiated_published"] = _seconds(at)
    request, initiated = topics.request, topics.initiated
    sizes: dict[str, list[int]] = {}
    times = await _record_times(
        bootstrap, [request, initiated, topics.completed, topics.failed], sizes
    )
    for booking, mark in marks.items():
        for topic, name in (
            (request, "request_ts"),
            (initiated, "initiated_ts"),
            (topics.completed, "outcome_ts"),
            (topics.failed, "outcome_ts"),
        ):
            if (topic, booking) in times:
                mark[name] = times[(topic, booking)]
    rows = []
    for name, start, end in STAGES:
        spans = sorted(
            1000 * (m[end] - m[start]) for m in marks.values() if start in m and end in m
        )
        cells = [percentile(spans, q) for q in (50, 95, 99)]
        rows.append([name, str(len(spans)), *("-" if c is None else f"{c:.1f}" for c in cells)])
    records = sum(count for count, _ in sizes.values())
    size = sum(total for _, total in sizes.values())
    return (
        table(rows, ["stage", "payments", "p50 ms", "p95 ms", "p99 ms"])
        + f"\nKafka records of the run (warm-up included): {records:,}, {size:,} bytes"
        + f" (keys, values, headers), {size / max(records, 1):.0f} bytes per record;"
        + " "
        + ", ".join(f"{t.rsplit('.', 1)[-1]} {c:,}" for t, (c, _) in sizes.items())
    )
