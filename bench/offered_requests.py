"""What the load generator sends and reads, apart from its Kafka client
(bench/orchestrator.py): a request's message, the open-loop schedule, an outcome's
booking."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime

import msgspec


class _Outcome(msgspec.Struct):
    booking_id: str


_decode_outcome = msgspec.json.Decoder(_Outcome).decode
_encode = msgspec.json.Encoder().encode

Headers = list[tuple[str, bytes]]


def request_message(booking: str, source: bytes) -> tuple[bytes, Headers]:
    """`saga.request_payment` for a new booking, in CloudEvents' binary mode."""
    value = _encode(
        {
            "booking_id": booking,
            "amount": 1999,
            "currency": "EUR",
            "payment_method": "pm_card_visa",
            "saga_id": f"saga-{booking}",
        }
    )
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", uuid.uuid4().hex.encode()),
        ("ce_source", source),
        ("ce_type", b"saga.request_payment"),
        ("ce_time", datetime.now(UTC).isoformat().encode()),
        ("content-type", b"application/json"),
    ]
    return value, headers


def requests_due(now: float, start: float, rate: float, total: int) -> int:
    """How many of `total` requests, the first due at `start` and one every `1 / rate` s,
    are due at `now`: none before `start` (a request goes at its time, never early)."""
    return min(total, max(0, math.floor((now - start) * rate) + 1))


def outcome_booking(value: bytes | None) -> str | None:
    """The booking an outcome event is for; None for anything else on the topic."""
    if value is None:
        return None
    try:
        return _decode_outcome(value).booking_id
    except msgspec.DecodeError:  # not JSON, or not an outcome (ValidationError)
        return None


async def offer_on_schedule(
    prefix: str,
    rate: float,
    duration_s: float,
    sent_at: dict[str, float],
    send: Callable[[str, bytes, Headers], Awaitable[None]],
    source: bytes,
) -> tuple[list[str], float]:
    """Send `rate` requests/s for `duration_s` through `send(booking, value, headers)`,
    open loop: request n at `start + n / rate`, recorded in `sent_at`, whatever the answers
    so far; requests that fell due while the sender was busy go at once. Returns the
    bookings and how late the sender was at worst (s)."""
    loop = asyncio.get_running_loop()
    total = max(1, round(rate * duration_s))
    bookings = [f"{prefix}-n{i}" for i in range(total)]
    start = loop.time() + 0.01
    worst_lag = 0.0
    i = 0
    while i < total:
        now = loop.time()
        due = requests_due(now, start, rate, total)
        if i < due:
            worst_lag = max(worst_lag, now - (start + i / rate))
        while i < due:
            booking = bookings[i]
            value, headers = request_message(booking, source)
            sent_at[booking] = start + i / rate
            await send(booking, value, headers)
            i += 1
        if i < total:
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
    return bookings, worst_lag


async def wait_for_answers(
    latency: Mapping[str, float], bookings: Sequence[str], timeout_s: float
) -> int:
    """How many of `bookings` have an outcome in `latency` once all have or `timeout_s`
    has passed (only those still waiting are looked at again)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    waiting = [b for b in bookings if b not in latency]
    while waiting and loop.time() < deadline:
        await asyncio.sleep(0.1)
        waiting = [b for b in waiting if b not in latency]
    return len(bookings) - len(waiting)
