"""In-memory EventStore, PaymentIndex, Outbox, Inbox and UnitOfWork for unit tests and scenarios."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from typing import Self

from payment.application.errors import (
    BookingAlreadyClaimed,
    ConcurrencyConflict,
    DuplicateMessage,
)
from payment.application.messages import OutboundMessage
from payment.application.ports import OutboxRecord, StoresPayments, StreamAppend
from payment.domain.events import AnyPaymentEvent
from payment.domain.payment import PaymentStatus


class SystemClock:
    """The wall clock, in UTC."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class MemoryDatabase:
    """The committed state shared by every unit of work of one in-memory "database"."""

    def __init__(self) -> None:
        self.streams: dict[uuid.UUID, list[AnyPaymentEvent]] = {}
        self.bookings: dict[str, uuid.UUID] = {}
        self.closed_bookings: set[str] = set()
        self.refunds_pending: dict[uuid.UUID, datetime] = {}
        self.status: dict[uuid.UUID, tuple[PaymentStatus, datetime]] = {}
        self.outbox: list[OutboxRecord] = []
        self.inbox: dict[tuple[str, str], datetime] = {}
        # Payments claimed by an open unit of work (PostgreSQL's row locks).
        self.claimed: set[uuid.UUID] = set()
        self.commits = 0


class MemoryEventStore:
    """Streams buffered in the unit of work, checked against committed versions."""

    def __init__(self, db: MemoryDatabase) -> None:
        self._db = db
        self.pending: dict[uuid.UUID, tuple[int, list[AnyPaymentEvent]]] = {}

    async def load(self, stream_id: uuid.UUID) -> list[AnyPaymentEvent]:
        committed = list(self._db.streams.get(stream_id, []))
        if stream_id in self.pending:
            committed += self.pending[stream_id][1]
        return committed

    async def load_many(
        self, stream_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, list[AnyPaymentEvent]]:
        found: dict[uuid.UUID, list[AnyPaymentEvent]] = {}
        for stream_id in stream_ids:
            events = await self.load(stream_id)
            if events:
                found[stream_id] = events
        return found

    async def append(
        self, stream_id: uuid.UUID, expected_version: int, events: Sequence[AnyPaymentEvent]
    ) -> None:
        self._check(stream_id, expected_version, events)
        base, buffered = self.pending.get(stream_id, (expected_version, []))
        self.pending[stream_id] = (base, [*buffered, *events])

    async def append_many(self, appends: Sequence[StreamAppend]) -> None:
        if len({a.stream_id for a in appends}) != len(appends):
            raise ValueError("append_many takes each stream once")
        # All checked before any is buffered: all or nothing.
        for a in appends:
            self._check(a.stream_id, a.expected_version, a.events)
        for a in appends:
            await self.append(a.stream_id, a.expected_version, a.events)

    def _check(
        self, stream_id: uuid.UUID, expected_version: int, events: Sequence[AnyPaymentEvent]
    ) -> None:
        committed = len(self._db.streams.get(stream_id, []))
        buffered = len(self.pending[stream_id][1]) if stream_id in self.pending else 0
        if committed + buffered != expected_version:
            raise ConcurrencyConflict(stream_id, expected_version)
        for offset, event in enumerate(events, start=1):
            if event.version != expected_version + offset or event.payment_id != stream_id:
                raise ValueError("events must continue the stream's versions without a gap")

    def check(self) -> None:
        for stream_id, (base, _) in self.pending.items():
            if len(self._db.streams.get(stream_id, [])) != base:
                raise ConcurrencyConflict(stream_id, base)

    def apply(self) -> None:
        for stream_id, (_, events) in self.pending.items():
            self._db.streams.setdefault(stream_id, []).extend(events)


class MemoryPaymentIndex:
    """Booking claims and payment status, buffered until commit."""

    def __init__(self, db: MemoryDatabase) -> None:
        self._db = db
        self.claims: dict[str, tuple[uuid.UUID, datetime]] = {}
        self.status: dict[uuid.UUID, tuple[PaymentStatus, datetime]] = {}
        self.requeued: dict[uuid.UUID, datetime] = {}
        self.held: set[uuid.UUID] = set()
        self.closing: set[str] = set()
        self.refund_marks: dict[uuid.UUID, datetime | None] = {}
        self.refunds_requeued: dict[uuid.UUID, datetime] = {}

    def _taken(self, booking_id: str) -> bool:
        return (
            booking_id in self._db.bookings
            or booking_id in self.claims
            or booking_id in self._db.closed_bookings
            or booking_id in self.closing
        )

    async def claim_booking(self, booking_id: str, payment_id: uuid.UUID, at: datetime) -> None:
        if self._taken(booking_id):
            raise BookingAlreadyClaimed(booking_id)
        self.claims[booking_id] = (payment_id, at)
        self.status[payment_id] = (PaymentStatus.INITIATED, at)

    async def claim_free_bookings(
        self, claims: Sequence[tuple[str, uuid.UUID]], at: datetime
    ) -> None:
        for booking_id, payment_id in claims:
            await self.claim_booking(booking_id, payment_id, at)

    async def claim_bookings(
        self, claims: Sequence[tuple[str, uuid.UUID]], at: datetime
    ) -> set[str]:
        claimed: set[str] = set()
        for booking_id, payment_id in claims:
            if not self._taken(booking_id):
                await self.claim_booking(booking_id, payment_id, at)
                claimed.add(booking_id)
        return claimed

    async def payment_for_booking(self, booking_id: str) -> uuid.UUID | None:
        if booking_id in self.claims:
            return self.claims[booking_id][0]
        return self._db.bookings.get(booking_id)

    async def set_status(self, payment_id: uuid.UUID, status: PaymentStatus, at: datetime) -> None:
        self.status[payment_id] = (status, at)

    async def set_statuses(
        self, statuses: Sequence[tuple[uuid.UUID, PaymentStatus]], at: datetime
    ) -> None:
        for payment_id, status in statuses:
            self.status[payment_id] = (status, at)

    async def in_flight_since(self, before: datetime, limit: int) -> list[uuid.UUID]:
        rows = [
            (at, pid)
            for pid, (status, at) in self._db.status.items()
            if status is PaymentStatus.INITIATED and at < before
        ]
        return [pid for _, pid in sorted(rows)[:limit]]

    async def claim_stale(self, before: datetime, limit: int, at: datetime) -> list[uuid.UUID]:
        free = [
            p
            for p in await self.in_flight_since(before, len(self._db.status))
            if p not in self._db.claimed
        ]
        picked = free[:limit]
        self._db.claimed.update(picked)
        self.held.update(picked)
        for payment_id in picked:
            self.requeued[payment_id] = at
        return picked

    def release(self) -> None:
        """The unit of work ended: its claims' locks go."""
        self._db.claimed.difference_update(self.held)
        self.held.clear()

    async def requeue(self, payment_id: uuid.UUID, at: datetime) -> None:
        self.requeued[payment_id] = at

    async def close_booking(self, booking_id: str, at: datetime) -> uuid.UUID | None:
        existing = await self.payment_for_booking(booking_id)
        if existing is not None:
            return existing
        if booking_id not in self._db.closed_bookings:
            self.closing.add(booking_id)
        return None

    async def booking_closed(self, booking_id: str) -> bool:
        return booking_id in self._db.closed_bookings or booking_id in self.closing

    async def set_refunds_pending(self, payment_id: uuid.UUID, since: datetime | None) -> None:
        self.refund_marks[payment_id] = since

    async def requeue_refunds(self, payment_id: uuid.UUID, at: datetime) -> None:
        self.refunds_requeued[payment_id] = at

    async def refunds_due(self, before: datetime, limit: int) -> list[uuid.UUID]:
        rows = []
        for pid, since in self._db.refunds_pending.items():
            status, updated = self._db.status.get(pid, (PaymentStatus.INITIATED, since))
            if status is PaymentStatus.INITIATED:
                continue
            if since < before or updated > since:
                rows.append((since, pid))
        return [pid for _, pid in sorted(rows)[:limit]]

    def check(self) -> None:
        for booking_id in [*self.claims, *self.closing]:
            if booking_id in self._db.bookings or booking_id in self._db.closed_bookings:
                raise BookingAlreadyClaimed(booking_id)

    def apply(self) -> None:
        for booking_id, (payment_id, _) in self.claims.items():
            self._db.bookings[booking_id] = payment_id
        self._db.status.update(self.status)
        self._db.closed_bookings |= self.closing
        for payment_id, since in self.refund_marks.items():
            if since is None:
                self._db.refunds_pending.pop(payment_id, None)
            else:
                self._db.refunds_pending[payment_id] = since
        for payment_id, at in self.refunds_requeued.items():
            if payment_id in self._db.refunds_pending:
                self._db.refunds_pending[payment_id] = at
        for payment_id, at in self.requeued.items():
            current = self._db.status.get(payment_id)
            if current is not None and current[0] is PaymentStatus.INITIATED:
                self._db.status[payment_id] = (PaymentStatus.INITIATED, at)


class MemoryOutbox:
    """Outbox rows, appended to the shared list in commit order; marks buffered until commit."""

    def __init__(self, db: MemoryDatabase) -> None:
        self._db = db
        self.pending_rows: list[OutboundMessage] = []
        self.published: dict[int, datetime] = {}

    async def add(self, messages: Sequence[OutboundMessage]) -> None:
        self.pending_rows.extend(messages)

    async def pending(
        self, limit: int, skip_keys: Collection[str] = (), skip_positions: Collection[int] = ()
    ) -> list[OutboxRecord]:
        return [
            r
            for r in self._db.outbox
            if r.published_at is None
            and r.position not in self.published
            and r.message.key not in skip_keys
            and r.position not in skip_positions
        ][:limit]

    async def mark_published(self, positions: Sequence[int], at: datetime) -> None:
        # Like every other write, a mark takes effect only if the unit of work commits.
        for position in positions:
            self.published.setdefault(position, at)

    def apply(self) -> None:
        if self.published:
            self._db.outbox = [
                OutboxRecord(
                    position=r.position, message=r.message, published_at=self.published[r.position]
                )
                if r.position in self.published and r.published_at is None
                else r
                for r in self._db.outbox
            ]
        for message in self.pending_rows:
            self._db.outbox.append(OutboxRecord(position=len(self._db.outbox) + 1, message=message))


class MemoryInbox:
    """Handled message ids, buffered until commit."""

    def __init__(self, db: MemoryDatabase) -> None:
        self._db = db
        self.marks: dict[tuple[str, str], datetime] = {}

    async def mark(self, source: str, message_id: str, at: datetime) -> bool:
        key = (source, message_id)
        if key in self._db.inbox or key in self.marks:
            return False
        self.marks[key] = at
        return True

    async def mark_many(
        self, keys: Sequence[tuple[str, str]], at: datetime
    ) -> set[tuple[str, str]]:
        return {key for key in keys if await self.mark(key[0], key[1], at)}

    async def mark_new(self, keys: Sequence[tuple[str, str]], at: datetime) -> None:
        for source, message_id in keys:
            if (source, message_id) in self._db.inbox:
                raise DuplicateMessage("message already handled")
            self.marks.setdefault((source, message_id), at)

    def check(self) -> bool:
        return not any(key in self._db.inbox for key in self.marks)

    def apply(self) -> None:
        self._db.inbox.update(self.marks)


class MemoryUnitOfWork(StoresPayments):
    """A transaction over `MemoryDatabase`: buffered writes, checked and applied at commit."""

    def __init__(self, db: MemoryDatabase) -> None:
        self._db = db
        self.events = MemoryEventStore(db)
        self.payments = MemoryPaymentIndex(db)
        self.outbox = MemoryOutbox(db)
        self.inbox = MemoryInbox(db)
        self._done = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._done = True
        self.payments.release()

    async def commit(self) -> None:
        if self._done:
            raise RuntimeError("unit of work already finished")
        self._done = True
        # Same outcomes as the database's constraints, checked before anything is applied.
        self.events.check()
        self.payments.check()
        if not self.inbox.check():
            # A concurrent handler marked the same message first: like a unique
            # violation at commit, nothing of this transaction survives.
            raise DuplicateMessage("message already handled by a concurrent transaction")
        self.events.apply()
        self.payments.apply()
        self.outbox.apply()
        self.inbox.apply()
        self.payments.release()
        self._db.commits += 1


class MemoryUnitOfWorkFactory:
    """Callable giving a fresh unit of work over one shared in-memory database."""

    def __init__(self, db: MemoryDatabase | None = None) -> None:
        self.db = db or MemoryDatabase()

    def __call__(self) -> MemoryUnitOfWork:
        return MemoryUnitOfWork(self.db)
