"""The bookings a demo run plays, and everything the orchestrator receives about them."""

from __future__ import annotations

import random
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Literal

import msgspec
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
from payment.adapters.kafka.topics import Topics
from payment.application.messages import REQUEST_PAYMENT, RequestPaymentMessage

# Different exponents on purpose (2, 0, 3): the service must not assume cents.
CURRENCIES: Final = ("EUR", "USD", "GBP", "JPY", "CHF", "SEK", "KWD")
PAYMENT_METHODS: Final = ("pm_card_visa", "pm_card_mastercard", "pm_card_amex")
DUPLICATES: Final = 4
POISON_VALUE: Final = b"{this is not JSON"

Kind = Literal["request", "invalid", "poison"]


class _OutcomeData(msgspec.Struct, kw_only=True):
    """The part of an outbound event the orchestrator reads (tolerant reader)."""

    booking_id: str
    reason: str | None = None


_outcome_decoder = msgspec.json.Decoder(_OutcomeData)
_encoder = msgspec.json.Encoder()


@dataclass
class Booking:
    booking_id: str
    kind: Kind
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


class Run:
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
        self.extras: list[Booking] = []
        self.invalid: Booking | None = None
        self.poison: Booking | None = None
        self.duplicates: list[Booking] = []
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
            self.poison = Booking(
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
        self.duplicates_sent: list[Booking] = []
        self.rerequest: Booking | None = None
        self.pending_sends = 0
        self.last_send_at: float | None = None
        self.seen: set[tuple[str, str, str]] = set()
        self.malformed = 0
        self.foreign_dead_letters = 0

    def _booking(self, booking_id: str, kind: Kind, message: RequestPaymentMessage) -> Booking:
        return Booking(booking_id, kind, _encoder.encode(message), self._headers())

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
        headers = header_map(record.headers)
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

    def follow_ups(self) -> list[tuple[Booking, list[tuple[str, bytes]]]]:
        """Messages that wait for an outcome: late duplicates and the re-request."""
        due: list[tuple[Booking, list[tuple[str, bytes]]]] = []
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


def header_map(headers: Sequence[tuple[str, bytes | None]] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for name, raw in headers or ():
        if raw is not None:
            result.setdefault(name.lower(), raw.decode("utf-8", "replace"))
    return result
