"""Every driven port of the service: event store, payment index, outbox, inbox, unit of
work and clock; and on the broker's side, dead letters, record senders and the re-drive
ledger."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from types import TracebackType
from typing import NamedTuple, Protocol, Self

import msgspec

from payment.application.messages import OutboundMessage
from payment.domain.events import AnyPaymentEvent
from payment.domain.payment import Payment, PaymentStatus


class StreamAppend(NamedTuple):
    """Events to append to one stream, continuing `expected_version` (see `append`)."""

    stream_id: uuid.UUID
    expected_version: int
    events: Sequence[AnyPaymentEvent]

    @classmethod
    def unsaved(cls, payment: Payment) -> StreamAppend:
        """The events `payment` decided since it was loaded, after the version it was
        loaded at (`Payment.collect_events`: handed over once)."""
        events = payment.collect_events()
        return cls(payment.id, payment.version - len(events), events)


class EventStore(Protocol):
    """Append-only streams of payment events, one stream per payment."""

    async def load(self, stream_id: uuid.UUID) -> list[AnyPaymentEvent]:
        """All events of the stream in version order; an empty list if it does not exist."""
        ...

    async def load_many(
        self, stream_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, list[AnyPaymentEvent]]:
        """`load` of several streams at once; a stream that does not exist is absent."""
        ...

    async def append(
        self, stream_id: uuid.UUID, expected_version: int, events: Sequence[AnyPaymentEvent]
    ) -> None:
        """Append events whose versions follow `expected_version` without a gap.

        Raises `ConcurrencyConflict` if the stream is no longer at `expected_version`
        (another writer appended first). Takes effect when the unit of work commits.
        """
        ...

    async def append_many(self, appends: Sequence[StreamAppend]) -> None:
        """`append` to several distinct streams, all or nothing.

        Raises `ConcurrencyConflict` if any stream is no longer at its expected version;
        the unit of work must then be abandoned (nothing of it may be committed).
        """
        ...


class PaymentIndex(Protocol):
    """Lookup side of the write model: booking -> payment, and which payments are in flight."""

    async def claim_booking(self, booking_id: str, payment_id: uuid.UUID, at: datetime) -> None:
        """Record the booking's one payment.

        Raises `BookingAlreadyClaimed` if the booking already has one — enforced by the
        store itself (a unique constraint), so it holds under concurrency.
        """
        ...

    async def claim_free_bookings(
        self, claims: Sequence[tuple[str, uuid.UUID]], at: datetime
    ) -> None:
        """`claim_booking` for (booking id, payment id) pairs whose bookings are expected to
        be free: the store need not answer before the unit of work commits (it can then
        send everything in one message). Each booking at most once.

        If one has a payment after all, the unit of work fails with
        `BookingAlreadyClaimed`, here or at the latest from `commit`, and keeps nothing:
        the caller handles the requests again the careful way. A store that finds out at
        commit may not tell which booking it was (`booking_id` is then empty).
        """
        ...

    async def claim_bookings(
        self, claims: Sequence[tuple[str, uuid.UUID]], at: datetime
    ) -> set[str]:
        """`claim_booking` for several (booking id, payment id) pairs; the bookings claimed.

        A booking that already has a payment is left out instead of raising (the caller
        decides what to do with it); the first pair of a booking given twice wins. A claim
        the store can only refuse at commit makes `commit` raise `BookingAlreadyClaimed`.
        """
        ...

    async def payment_for_booking(self, booking_id: str) -> uuid.UUID | None:
        """The id of the booking's payment, or None."""
        ...

    async def set_status(self, payment_id: uuid.UUID, status: PaymentStatus, at: datetime) -> None:
        """Record the payment's current state (kept in step with its stream)."""
        ...

    async def set_statuses(
        self, statuses: Sequence[tuple[uuid.UUID, PaymentStatus]], at: datetime
    ) -> None:
        """`set_status` for several distinct payments."""
        ...

    async def in_flight_since(self, before: datetime, limit: int) -> list[uuid.UUID]:
        """Payments still INITIATED whose last change is older than `before`, oldest first."""
        ...

    async def claim_stale(self, before: datetime, limit: int, at: datetime) -> list[uuid.UUID]:
        """Claim up to `limit` of `in_flight_since(before)`, oldest first, for reconciling.

        Payments another open unit of work has claimed are skipped, so concurrent
        claimers (in this process or another) get disjoint sets. A claimed payment counts
        `at` as its last change when this commits: a lease, as nobody claims it again
        until it is older than the cutoff once more.
        """
        ...

    async def requeue(self, payment_id: uuid.UUID, at: datetime) -> None:
        """Count `at` as the payment's last change if it is still INITIATED when this
        commits (to the back of `in_flight_since`); a finished payment is left alone."""
        ...

    async def close_booking(self, booking_id: str, at: datetime) -> uuid.UUID | None:
        """Close a booking that has no payment, so that none is ever created for it (a
        refund overtook its payment request, contract 4.8).

        Returns None once the booking is closed (now, or before), or the id of the payment
        it has (nothing changed). Holds under concurrency with `claim_booking`: one of the
        two wins, enforced by the store (the same unique constraint).
        """
        ...

    async def booking_closed(self, booking_id: str) -> bool:
        """True if `close_booking` closed this booking (`payment_for_booking` is None then)."""
        ...

    async def set_refunds_pending(self, payment_id: uuid.UUID, since: datetime | None) -> None:
        """Record that the payment has refunds pending since `since` (None: none pending)."""
        ...

    async def requeue_refunds(self, payment_id: uuid.UUID, at: datetime) -> None:
        """Count `at` as the refunds-pending mark if the payment is still marked when this
        commits (to the back of `refunds_due`); an unmarked payment is left alone."""
        ...

    async def refunds_due(self, before: datetime, limit: int) -> list[uuid.UUID]:
        """Payments with refunds pending whose charge has settled, oldest first: those
        whose refunds waited for the charge (it settled after they were marked), and
        those marked before `before` (a refund whose gateway call did not answer)."""
        ...


class OutboxRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A stored outbox row: its position and the message to publish."""

    position: int
    message: OutboundMessage
    published_at: datetime | None = None


class Outbox(Protocol):
    """Messages to publish, written in the same transaction as the state they announce."""

    async def add(self, messages: Sequence[OutboundMessage]) -> None:
        """Queue messages for publication; they become visible when the unit of work commits."""
        ...

    async def pending(
        self, limit: int, skip_keys: Collection[str] = (), skip_positions: Collection[int] = ()
    ) -> list[OutboxRecord]:
        """Unpublished rows, oldest first, but for those whose key is in `skip_keys` or
        whose position is in `skip_positions`.

        Never skips a row otherwise: a row committed later by a slower transaction is
        returned by a later call. Rows of one stream come back in the order they were
        written. (`skip_keys`: keys backing off, so that their rows cannot fill `limit`;
        `skip_positions`: rows the broker acknowledged whose mark is not committed yet.)
        """
        ...

    async def mark_published(self, positions: Sequence[int], at: datetime) -> None:
        """Mark rows as published (after the broker acknowledged them)."""
        ...


class Inbox(Protocol):
    """Inbound messages already handled, keyed by CloudEvents (source, id)."""

    async def mark(self, source: str, message_id: str, at: datetime) -> bool:
        """Record the message as handled; False if it was already recorded (a duplicate).

        Takes effect with the unit of work: a rolled-back handling leaves no mark. An
        adapter that cannot tell before commit may raise `DuplicateMessage` from `commit`.
        """
        ...

    async def mark_many(
        self, keys: Sequence[tuple[str, str]], at: datetime
    ) -> set[tuple[str, str]]:
        """`mark` for several (source, id) keys; the keys marked now.

        The others were recorded before (duplicates); a key given twice is marked once.
        """
        ...

    async def mark_new(self, keys: Sequence[tuple[str, str]], at: datetime) -> None:
        """`mark_many` for messages expected to be new: the store need not answer before
        the unit of work commits (it can then send everything in one message).

        If one was handled before after all (or is by a concurrent unit of work that
        commits), the unit of work fails with `DuplicateMessage`, here or at the latest
        from `commit`, and keeps nothing: the caller handles the messages again the
        careful way, where they show as duplicates.
        """
        ...


class UnitOfWork(Protocol):
    """One transaction: everything done through it commits together or not at all."""

    # Read-only members, so an adapter's more specific types (PostgresEventStore, …)
    # satisfy the protocol; plain attributes would be invariant and match no adapter.
    @property
    def events(self) -> EventStore: ...

    @property
    def payments(self) -> PaymentIndex: ...

    @property
    def outbox(self) -> Outbox: ...

    @property
    def inbox(self) -> Inbox: ...

    async def __aenter__(self) -> Self:
        """Begin the transaction."""
        ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """End it: roll back whatever was not committed."""
        ...

    async def find(self, payment_id: uuid.UUID) -> Payment | None:
        """The payment as its stored events (and those appended in this unit of work) make
        it; None if it does not exist."""
        ...

    async def load(self, payment_id: uuid.UUID) -> Payment:
        """`find` of a payment known to exist (`StreamMismatch` if it does not)."""
        ...

    async def save(self, payment: Payment) -> None:
        """Append the events `payment` decided since it was loaded, after the version it
        was loaded at (`EventStore.append`: `ConcurrencyConflict` if another writer came
        first)."""
        ...

    async def save_all(self, payments: Sequence[Payment]) -> None:
        """`save` of several distinct payments, all or nothing (`EventStore.append_many`)."""
        ...

    async def commit(self) -> None:
        """Commit the transaction; the unit of work cannot be used afterwards."""
        ...


UnitOfWorkFactory = Callable[[], UnitOfWork]


class _HasEvents(Protocol):
    @property
    def events(self) -> EventStore: ...


class StoresPayments:
    """`UnitOfWork.find`, `load`, `save` and `save_all`, written once for every unit of
    work (a mixin): payments go to and from its `events` store."""

    async def find(self: _HasEvents, payment_id: uuid.UUID) -> Payment | None:
        events = await self.events.load(payment_id)
        return Payment.replay(events) if events else None

    async def load(self: _HasEvents, payment_id: uuid.UUID) -> Payment:
        return Payment.replay(await self.events.load(payment_id))

    async def save(self: _HasEvents, payment: Payment) -> None:
        await self.events.append(*StreamAppend.unsaved(payment))

    async def save_all(self: _HasEvents, payments: Sequence[Payment]) -> None:
        await self.events.append_many([StreamAppend.unsaved(p) for p in payments])


class Clock(Protocol):
    """The time, injectable so tests control it."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


# -- the broker's side ---------------------------------------------------------------------


class ConsumedRecord(Protocol):
    """What the service reads of a record consumed from the broker (aiokafka's
    `ConsumerRecord` is one)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes | None]]: ...


class DeadLetters(Protocol):
    """Where a consumed record no handler can take is parked, with its reason."""

    async def publish(self, record: ConsumedRecord, reason: str) -> None:
        """Park the original record with its reason; returns once the broker acknowledged it."""
        ...


class RecordSender(Protocol):
    """What the service needs of a broker producer (`AIOKafkaProducer`); a test can fake it."""

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: Sequence[tuple[str, bytes | None]] | None = None,
    ) -> object:
        """Send one record; returns once the broker acknowledged it, raises if it did not."""
        ...


class RecordQueue(RecordSender, Protocol):
    """A sender that can also queue a record and hand back its acknowledgement to await."""

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: Sequence[tuple[str, bytes | None]] | None = None,
    ) -> asyncio.Future[object]:
        """Queue one record; the future resolves when the broker acknowledged it (or fails)."""
        ...


class RedriveClaim(Protocol):
    """One dead letter held for re-driving."""

    async def done(self, partition: int, offset: int) -> None:
        """Record where the copy went; takes effect with the claim."""
        ...


class RedriveLedger(Protocol):
    """Which dead letters were re-driven (see adapters/postgres/redrives.py)."""

    def claim(
        self,
        dlq_topic: str,
        dlq_partition: int,
        dlq_offset: int,
        *,
        original_topic: str,
        original_partition: int | None,
        original_offset: int | None,
    ) -> AbstractAsyncContextManager[RedriveClaim | None]:
        """Hold the dead letter for re-driving, or None if it was re-driven already.

        Commits when the block ends normally; a block that raises leaves no claim.
        """
        ...
