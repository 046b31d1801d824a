"""`payment-service show`'s read side on a real PostgreSQL: stream, outbox state, booking lookup."""

from __future__ import annotations

import uuid

from payment.adapters.memory import SystemClock
from payment.adapters.postgres.pool import Pool
from payment.adapters.postgres.queries import (
    find_payment_by_booking,
    load_payment_history,
    render_payment,
)
from payment.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from payment.adapters.processors.fake import FakeProcessor
from payment.application.commands import (
    ExecutePayment,
    InboundRef,
    RequestPayment,
    SettleRefunds,
)
from payment.application.handlers import execute_payment, request_payment
from payment.application.refunds import RefundResult, Refunds
from payment.domain.events import (
    ChargeAttempted,
    ChargeStarted,
    PaymentCompleted,
    PaymentInitiated,
)
from support.commands import refund_cmd

CLOCK = SystemClock()


async def _completed_payment(
    uow_factory: PostgresUnitOfWorkFactory, gateway: FakeProcessor | None = None
) -> uuid.UUID:
    await request_payment(
        RequestPayment(
            inbound=InboundRef(source="saga", message_id="r-1"),
            booking_id="booking-1",
            amount=4200,
            currency="EUR",
            payment_method="pm_secret_token",
        ),
        uow_factory,
        CLOCK,
    )
    async with uow_factory() as uow:
        payment_id = await uow.payments.payment_for_booking("booking-1")
    assert payment_id is not None
    await execute_payment(
        ExecutePayment(inbound=InboundRef(source="svc", message_id="e-1"), payment_id=payment_id),
        uow_factory,
        gateway or FakeProcessor(),
        CLOCK,
    )
    return payment_id


async def test_the_history_shows_events_and_which_outbox_rows_were_published(
    pg_uow_factory: PostgresUnitOfWorkFactory, pg_pool: Pool
) -> None:
    payment_id = await _completed_payment(pg_uow_factory)
    async with pg_uow_factory() as uow:
        first = (await uow.outbox.pending(1))[0]
        await uow.outbox.mark_published([first.position], CLOCK.now())
        await uow.commit()

    async with pg_pool.connection() as conn:
        assert await find_payment_by_booking(conn, "booking-1") == payment_id
        assert await find_payment_by_booking(conn, "booking-2") is None
        history = await load_payment_history(conn, payment_id)
        assert await load_payment_history(conn, uuid.uuid4()) is None

    assert history is not None
    assert history.booking_id == "booking-1"
    assert history.status == "COMPLETED"
    assert [type(s.event) for s in history.events] == [
        PaymentInitiated,
        ChargeStarted,
        ChargeAttempted,
        PaymentCompleted,
    ]
    assert [(r.type, r.sequence, r.published) for r in history.outbox] == [
        ("payment.initiated", 1, True),
        ("payment.completed", 4, False),
    ]
    assert history.outbox[1].event_id == history.events[3].event.event_id


async def test_render_finds_a_payment_by_id_or_booking_and_hides_the_payment_method(
    pg_uow_factory: PostgresUnitOfWorkFactory, database_url: str
) -> None:
    payment_id = await _completed_payment(pg_uow_factory)

    by_id = await render_payment(database_url, payment_id=payment_id)
    by_booking = await render_payment(database_url, booking_id="booking-1")

    assert by_id is not None and by_id == by_booking
    text = "\n".join(by_id)
    assert str(payment_id) in text
    assert "PaymentCompleted" in text and "PENDING" in text
    assert "pm_secret_token" not in text
    assert await render_payment(database_url, booking_id="booking-2") is None
    assert await render_payment(database_url, payment_id=uuid.uuid4()) is None


async def test_show_lists_refunds_and_a_closed_booking(
    pg_uow_factory: PostgresUnitOfWorkFactory, database_url: str
) -> None:
    gateway = FakeProcessor()
    payment_id = await _completed_payment(pg_uow_factory, gateway)
    refunds = Refunds(pg_uow_factory, gateway, CLOCK)
    for amount in (1000, 5000):  # the second is an over-refund: no refund created
        result, _ = await refunds.request(refund_cmd("booking-1", amount=amount))
        if result is RefundResult.ACCEPTED:
            await refunds.settle(SettleRefunds(payment_id=payment_id))
    await refunds.request(refund_cmd("booking-closed"))

    shown = await render_payment(database_url, payment_id=payment_id)
    assert shown is not None
    text = "\n".join(shown)
    assert "refunds (1): 1000 of 4200 EUR refunded, payment PARTIALLY_REFUNDED" in text
    assert "amount=1000" in text and "refunded " in text and "ref=fake_re_" in text
    assert "RefundRequested" in text and "PaymentRefunded" in text
    assert "payment.refunded" in text

    closed = await render_payment(database_url, booking_id="booking-closed")
    assert closed is not None
    assert "closed by a refund" in "\n".join(closed)
