"""Read side for operators (`payment-service show`): a payment's stream and its outbox rows."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import msgspec
from psycopg import AsyncConnection, IsolationLevel

from payment.adapters.postgres.pool import Connection
from payment.domain.errors import DomainError
from payment.domain.events import AnyPaymentEvent, PaymentRefunded, event_type
from payment.domain.payment import Payment
from payment.domain.upcasting import decode_stored

# Envelope fields are printed in the line's prefix; the payment method is a gateway token
# and stays out of terminals and pasted tickets.
_NOT_PRINTED = frozenset({"event_id", "payment_id", "version", "occurred_at", "payment_method"})


class StoredEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event as stored: its global position and when it was recorded."""

    position: int
    recorded_at: datetime
    event: AnyPaymentEvent


class OutboxEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One outbox row of a payment and whether the relay has published it."""

    position: int
    event_id: uuid.UUID
    type: str
    sequence: int | None
    created_at: datetime
    published_at: datetime | None

    @property
    def published(self) -> bool:
        return self.published_at is not None


class PaymentHistory(msgspec.Struct, frozen=True, kw_only=True):
    """A payment's index row, its events in version order and its outbox rows in order."""

    payment_id: uuid.UUID
    booking_id: str | None
    status: str | None
    updated_at: datetime | None
    events: list[StoredEvent]
    outbox: list[OutboxEntry]


async def find_payment_by_booking(conn: Connection, booking_id: str) -> uuid.UUID | None:
    """The id of the booking's payment, or None."""
    cur = await conn.execute(
        "SELECT payment_id FROM payment_payments WHERE booking_id = %s", (booking_id,)
    )
    row = await cur.fetchone()
    return None if row is None else uuid.UUID(str(row[0]))


async def load_payment_history(conn: Connection, payment_id: uuid.UUID) -> PaymentHistory | None:
    """Everything stored about one payment, or None if nothing is.

    Run it in a REPEATABLE READ transaction for a consistent picture (`render_payment` does).
    """
    cur = await conn.execute(
        "SELECT booking_id, status, updated_at FROM payment_payments WHERE payment_id = %s",
        (payment_id,),
    )
    index_row = await cur.fetchone()
    cur = await conn.execute(
        "SELECT position, recorded_at, event_type, schema_version, data::text FROM payment_events"
        " WHERE stream_id = %s ORDER BY version",
        (payment_id,),
    )
    events = [
        StoredEvent(
            position=position,
            recorded_at=_utc(recorded_at),
            event=decode_stored(kind, schema_version, data),
        )
        for position, recorded_at, kind, schema_version, data in await cur.fetchall()
    ]
    cur = await conn.execute(
        "SELECT position, event_id, type, sequence, created_at, published_at"
        " FROM payment_outbox WHERE subject = %s ORDER BY position",
        (str(payment_id),),
    )
    outbox = [
        OutboxEntry(
            position=position,
            event_id=event_id,
            type=kind,
            sequence=sequence,
            created_at=_utc(created_at),
            published_at=None if published_at is None else _utc(published_at),
        )
        for position, event_id, kind, sequence, created_at, published_at in await cur.fetchall()
    ]
    if index_row is None and not events and not outbox:
        return None
    booking_id, status, updated_at = index_row if index_row is not None else (None, None, None)
    return PaymentHistory(
        payment_id=payment_id,
        booking_id=booking_id,
        status=status,
        updated_at=None if updated_at is None else _utc(updated_at),
        events=events,
        outbox=outbox,
    )


def format_history(history: PaymentHistory) -> list[str]:
    """Human-readable lines of a payment's history (no payment method)."""
    lines = [
        f"payment {history.payment_id}",
        f"  booking  {history.booking_id or '-'}",
        f"  status   {history.status or '-'}"
        + (f" (since {_iso(history.updated_at)})" if history.updated_at else ""),
        f"events ({len(history.events)}):",
    ]
    for stored in history.events:
        event = stored.event
        fields = {
            name: value
            for name, value in msgspec.structs.asdict(event).items()
            if name not in _NOT_PRINTED
        }
        detail = " ".join(f"{name}={_show(value)}" for name, value in fields.items())
        lines.append(
            f"  v{event.version:<3} {_iso(event.occurred_at)}  {event_type(event):<24} {detail}"
        )
    lines += _refund_lines(history)
    lines.append(f"outbox ({len(history.outbox)}):")
    for row in history.outbox:
        state = f"published {_iso(row.published_at)}" if row.published_at else "PENDING"
        sequence = "-" if row.sequence is None else str(row.sequence)
        lines.append(
            f"  #{row.position:<8} {row.type:<18} seq={sequence:<3} ce_id={row.event_id}  {state}"
        )
    return lines


def _refund_lines(history: PaymentHistory) -> list[str]:
    """The payment's refunds, one line each, and what is refunded of what was charged."""
    if history.status == "CANCELLED" and not history.events:
        return ["  (a booking closed by a refund before any payment request: no payment)"]
    if not history.events:
        return []
    try:
        payment = Payment.replay(stored.event for stored in history.events)
    except DomainError as exc:  # show what is stored even if it does not replay
        return [f"refunds: cannot replay the stream ({exc})"]
    if not payment.refunds:
        return []
    lines = [
        f"refunds ({len(payment.refunds)}): {payment.refunded_total} of {payment.money.amount} "
        f"{payment.money.currency} refunded, payment {payment.status}",
    ]
    for refund in payment.refunds.values():
        outcome = refund.outcome
        if outcome is None:
            state = "PENDING"
        elif isinstance(outcome, PaymentRefunded):
            state = f"refunded {_iso(outcome.occurred_at)} ref={outcome.provider_reference}"
        else:
            state = f"failed {_iso(outcome.occurred_at)} reason={outcome.reason}"
        lines.append(
            f"  {refund.id}  amount={refund.amount:<10} requested "
            f"{_iso(refund.requested.occurred_at)}  {state}"
        )
    return lines


async def render_payment(
    url: str, *, payment_id: uuid.UUID | None = None, booking_id: str | None = None
) -> list[str] | None:
    """`show`: the lines describing a payment, by id or by booking; None if there is none."""
    if (payment_id is None) == (booking_id is None):
        raise ValueError("give exactly one of payment_id and booking_id")
    async with await AsyncConnection.connect(url) as conn:
        await conn.set_isolation_level(IsolationLevel.REPEATABLE_READ)
        await conn.set_read_only(True)
        if payment_id is None:
            assert booking_id is not None
            payment_id = await find_payment_by_booking(conn, booking_id)
            if payment_id is None:
                return None
        history = await load_payment_history(conn, payment_id)
        return None if history is None else format_history(history)


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _iso(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).isoformat(timespec="milliseconds")


def _show(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return _iso(value)
    return str(value) if not isinstance(value, str) or " " not in value else repr(value)
