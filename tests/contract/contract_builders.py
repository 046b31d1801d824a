"""Events, messages and race helpers shared by the port contract suites."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from payment.application.commands import TraceHeaders
from payment.application.errors import RETRYABLE_CONFLICTS
from payment.application.messages import OutboundMessage, OutboundType
from payment.application.ports import UnitOfWork, UnitOfWorkFactory
from payment.domain.events import (
    AnyPaymentEvent,
    ChargeAttempted,
    PaymentCompleted,
    PaymentFailed,
    PaymentFlaggedForReview,
    PaymentInitiated,
)

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def initiated(stream: uuid.UUID, *, booking_id: str = "booking-1") -> PaymentInitiated:
    return PaymentInitiated(
        event_id=uuid.uuid4(),
        payment_id=stream,
        version=1,
        occurred_at=T0,
        booking_id=booking_id,
        saga_id="saga-1",
        amount=1250,
        currency="EUR",
        customer_id=None,
        payment_method="pm_card_visa",
        idempotency_key=uuid.uuid4(),
    )


def attempted(stream: uuid.UUID, version: int) -> ChargeAttempted:
    return ChargeAttempted(
        event_id=uuid.uuid4(),
        payment_id=stream,
        version=version,
        occurred_at=at(version),
        attempt=version - 1,
        processor="fake",
        result="unknown",
        detail="charge: OutcomeUnknown: no answer",
    )


def every_event_type(stream: uuid.UUID) -> list[AnyPaymentEvent]:
    """One event of each type, versions 1..5 (a stream no aggregate would write; the store
    does not care)."""
    return [
        initiated(stream),
        attempted(stream, 2),
        PaymentFlaggedForReview(
            event_id=uuid.uuid4(),
            payment_id=stream,
            version=3,
            occurred_at=at(3.000123),
            detail="outcome unknown for 3600s: needs manual review",
        ),
        PaymentFailed(
            event_id=uuid.uuid4(),
            payment_id=stream,
            version=4,
            occurred_at=at(4),
            reason="declined",
            detail="payment declined by the processor (card_declined)",
            decline_code="card_declined",
        ),
        PaymentCompleted(
            event_id=uuid.uuid4(),
            payment_id=stream,
            version=5,
            occurred_at=at(5),
            processor="fake",
            provider_reference="fake_0123456789abcdef01234567",
        ),
    ]


def message(
    key: str,
    *,
    sequence: int | None = 1,
    kind: OutboundType = "payment.initiated",
    event_id: uuid.UUID | None = None,
    trace: TraceHeaders | None = None,
) -> OutboundMessage:
    return OutboundMessage(
        event_id=event_id or uuid.uuid4(),
        type=kind,
        key=key,
        subject=key if sequence is not None else None,
        sequence=sequence,
        time=at(sequence or 0),
        data=b'{"payment_id":"%s","version":%d}' % (key.encode(), sequence or 0),
        trace=trace or TraceHeaders(),
    )


Write = Callable[[UnitOfWork], Awaitable[object]]


async def attempt(uow_factory: UnitOfWorkFactory, write: Write) -> bool:
    """Run `write` in a fresh unit of work and commit; False if it lost a race."""
    try:
        async with uow_factory() as uow:
            if await write(uow) is False:
                return False
            await uow.commit()
    except RETRYABLE_CONFLICTS:
        return False
    return True


async def race(uow_factory: UnitOfWorkFactory, first: Write, second: Write) -> tuple[bool, bool]:
    """Two writers overlapping: `first` writes, `second` writes and commits meanwhile,
    then `first` commits. Which of them each adapter lets win may differ (PostgreSQL
    makes `second` wait for `first`; memory finds the clash at commit); the contract is
    that exactly one does."""
    async with uow_factory() as uow:
        await first(uow)
        second_task = asyncio.create_task(attempt(uow_factory, second))
        # Long enough for `second` to reach its write (and block there, on PostgreSQL).
        await asyncio.sleep(0.1)
        try:
            await uow.commit()
            first_won = True
        except RETRYABLE_CONFLICTS:
            first_won = False
    return first_won, await second_task
