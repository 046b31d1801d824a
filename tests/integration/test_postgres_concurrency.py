"""The PostgreSQL adapters under concurrent handlers, writers and migrators, on a real database."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter, defaultdict

import pytest
from msgspec.structs import replace

from payment.adapters.memory import SystemClock
from payment.adapters.postgres.migrations import (
    Migration,
    MigrationError,
    apply_migrations,
    available_migrations,
    migrate,
)
from payment.adapters.postgres.pool import Pool, connect_dedicated
from payment.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from payment.adapters.processors.fake import FakeProcessor
from payment.application.commands import ExecutePayment, InboundRef, RequestPayment
from payment.application.errors import ConcurrencyConflict, PaymentConflict
from payment.application.handlers import (
    ExecuteResult,
    RequestResult,
    execute_payment,
    request_payment,
)
from payment.application.ports import UnitOfWork
from payment.domain.events import (
    ChargeAttempted,
    ChargeStarted,
    PaymentCompleted,
    PaymentFailed,
)
from support.events import attempted, message
from support.fixtures import DatabaseFactory

CLOCK = SystemClock()


def _request(booking_id: str, message_id: str) -> RequestPayment:
    return RequestPayment(
        inbound=InboundRef(source="saga", message_id=message_id),
        booking_id=booking_id,
        amount=4200,
        currency="EUR",
        payment_method="pm_card_visa",
        saga_id="saga-1",
    )


async def _scalar(pool: Pool, query: str, *params: object) -> object:
    async with pool.connection() as conn:
        cur = await conn.execute(query.encode(), params)
        row = await cur.fetchone()
    assert row is not None
    return row[0]


async def _payment_of(uow_factory: PostgresUnitOfWorkFactory, booking_id: str) -> uuid.UUID:
    async with uow_factory() as uow:
        payment_id = await uow.payments.payment_for_booking(booking_id)
    assert payment_id is not None
    return payment_id


@pytest.mark.parametrize("redelivered", [False, True], ids=["new-ids", "same-id"])
async def test_concurrent_executions_of_one_payment_record_one_outcome(
    pg_uow_factory: PostgresUnitOfWorkFactory, pg_pool: Pool, redelivered: bool
) -> None:
    assert await request_payment(_request("booking-1", "r-1"), pg_uow_factory, CLOCK) is (
        RequestResult.ACCEPTED
    )
    payment_id = await _payment_of(pg_uow_factory, "booking-1")
    # Latency makes all twenty load the stream before any of them records an outcome.
    processor = FakeProcessor(mode="success", latency_ms=30)

    def command(i: int) -> ExecutePayment:
        message_id = "e-1" if redelivered else f"e-{i}"
        return ExecutePayment(
            inbound=InboundRef(source="payment-service", message_id=message_id),
            payment_id=payment_id,
        )

    results = await asyncio.gather(
        *(execute_payment(command(i), pg_uow_factory, processor, CLOCK) for i in range(20))
    )

    counts = Counter(results)
    assert counts[ExecuteResult.COMPLETED] == 1, counts
    assert set(counts) <= {
        ExecuteResult.COMPLETED,
        ExecuteResult.ALREADY_TERMINAL,
        ExecuteResult.DUPLICATE,
        ExecuteResult.BUSY,  # another execution's ChargeStarted came first
    }, counts
    async with pg_uow_factory() as uow:
        events = await uow.events.load(payment_id)
    terminal = [e for e in events if isinstance(e, PaymentCompleted | PaymentFailed)]
    assert len(terminal) == 1
    # One write-ahead only: the others found its lease and charged nothing.
    assert [type(e) for e in events[1:]] == [ChargeStarted, ChargeAttempted, PaymentCompleted]
    assert len(processor.charges) == 1
    assert (
        await _scalar(
            pg_pool, "SELECT count(*) FROM payment_outbox WHERE type = 'payment.completed'"
        )
        == 1
    )
    assert await _scalar(pg_pool, "SELECT status FROM payment_payments") == "COMPLETED"


@pytest.mark.parametrize("redelivered", [False, True], ids=["new-ids", "same-id"])
async def test_concurrent_requests_for_one_booking_create_one_payment(
    pg_uow_factory: PostgresUnitOfWorkFactory, pg_pool: Pool, redelivered: bool
) -> None:
    requests = [_request("booking-1", "r-1" if redelivered else f"r-{i}") for i in range(50)]

    results = await asyncio.gather(*(request_payment(r, pg_uow_factory, CLOCK) for r in requests))

    counts = Counter(results)
    assert counts[RequestResult.ACCEPTED] == 1, counts
    others = RequestResult.DUPLICATE if redelivered else RequestResult.IN_FLIGHT
    assert counts[others] == 49, counts
    assert await _scalar(pg_pool, "SELECT count(*) FROM payment_payments") == 1
    assert await _scalar(pg_pool, "SELECT count(*) FROM payment_events") == 1
    assert await _scalar(pg_pool, "SELECT count(*) FROM payment_outbox") == 1
    assert await _scalar(pg_pool, "SELECT count(*) FROM payment_inbox") == (
        1 if redelivered else 50
    )


async def test_a_redelivery_and_a_re_request_fail_the_first_try_and_keep_nothing_of_it(
    pg_uow_factory: PostgresUnitOfWorkFactory, pg_pool: Pool
) -> None:
    # The first try of a request is one message that expects a new message id and a free
    # booking. A redelivery fails it on the inbox's key, a re-request on the booking's: the
    # careful try then answers, and no row of the failed message stays (one payment, one
    # event, one outbox row; an inbox row per distinct message id).
    assert await request_payment(_request("booking-1", "r-1"), pg_uow_factory, CLOCK) is (
        RequestResult.ACCEPTED
    )
    redelivered = await request_payment(_request("booking-1", "r-1"), pg_uow_factory, CLOCK)
    re_requested = await request_payment(_request("booking-1", "r-2"), pg_uow_factory, CLOCK)
    other = replace(_request("booking-1", "r-3"), amount=4300)
    with pytest.raises(PaymentConflict):
        await request_payment(other, pg_uow_factory, CLOCK)

    assert (redelivered, re_requested) == (RequestResult.DUPLICATE, RequestResult.IN_FLIGHT)
    assert await _scalar(pg_pool, "SELECT count(*) FROM payment_payments") == 1
    assert await _scalar(pg_pool, "SELECT count(*) FROM payment_events") == 1
    assert await _scalar(pg_pool, "SELECT count(*) FROM payment_outbox") == 1
    inbox = "SELECT array_agg(message_id ORDER BY message_id) FROM payment_inbox"
    assert await _scalar(pg_pool, inbox) == ["r-1", "r-2"]


async def test_the_outbox_reader_sees_every_row_once_and_each_stream_in_order(
    pg_uow_factory: PostgresUnitOfWorkFactory, pg_pool: Pool
) -> None:
    """Writers race on shared streams and some hold their transaction open after drawing an
    outbox position, so rows commit out of position order while a reader drains the outbox.
    """
    streams = [uuid.uuid4() for _ in range(8)]
    events_per_stream = 12
    rng = random.Random(7)

    async def stream_writer(stream: uuid.UUID) -> None:
        while True:
            try:
                async with pg_uow_factory() as uow:
                    version = len(await uow.events.load(stream))
                    if version >= events_per_stream:
                        return
                    await uow.events.append(stream, version, [attempted(stream, version + 1)])
                    await uow.outbox.add([message(str(stream), sequence=version + 1)])
                    if rng.random() < 0.4:
                        await _send_now(uow)
                        await asyncio.sleep(rng.uniform(0.005, 0.03))
                    await uow.commit()
            except ConcurrencyConflict:
                continue

    async def laggard(n: int) -> None:
        # Draws a position, then commits well after faster writers drew later ones.
        async with pg_uow_factory() as uow:
            await uow.outbox.add([message(f"laggard-{n}", sequence=None)])
            await _send_now(uow)
            await asyncio.sleep(rng.uniform(0.02, 0.06))
            await uow.commit()

    async def laggards() -> None:
        for n in range(20):
            await asyncio.gather(laggard(2 * n), laggard(2 * n + 1))

    writers = asyncio.gather(
        *(stream_writer(s) for s in streams for _ in range(3)),
        laggards(),
    )
    seen: list[tuple[int, str, int | None]] = []
    late = 0
    while True:
        done = writers.done()
        async with pg_uow_factory() as uow:
            rows = await uow.outbox.pending(7)
            await uow.outbox.mark_published([r.position for r in rows], CLOCK.now())
            await uow.commit()
        for row in rows:
            if seen and row.position < max(p for p, _, _ in seen):
                late += 1
            seen.append((row.position, row.message.key, row.message.sequence))
        if done and not rows:
            break
        if not rows:
            await asyncio.sleep(0.001)
    await writers

    async with pg_pool.connection() as conn:
        cur = await conn.execute("SELECT position FROM payment_outbox ORDER BY position")
        stored = [position for (position,) in await cur.fetchall()]
    assert len(stored) == len(streams) * events_per_stream + 40
    assert sorted(p for p, _, _ in seen) == stored, "a row was skipped or seen twice"
    by_stream: dict[str, list[int | None]] = defaultdict(list)
    for _, key, sequence in seen:
        if not key.startswith("laggard-"):
            by_stream[key].append(sequence)
    assert by_stream == {str(s): list(range(1, events_per_stream + 1)) for s in streams}
    # The test is only worth something if rows did commit behind the reader's progress.
    assert late > 0


async def _send_now(uow: UnitOfWork) -> None:
    """Make the unit of work send its queued writes now (a read sees them, so it sends
    them first): the outbox row draws its position here, long before the commit."""
    await uow.events.load(uuid.uuid4())


async def _applied(url: str) -> list[int]:
    conn = await connect_dedicated(url)
    async with conn:
        cur = await conn.execute("SELECT version FROM payment_schema_migrations ORDER BY version")
        return [version for (version,) in await cur.fetchall()]


async def _tables(url: str) -> set[str]:
    conn = await connect_dedicated(url)
    async with conn:
        cur = await conn.execute(
            "SELECT tablename FROM pg_tables"
            " WHERE schemaname = 'public' AND tablename LIKE 'payment%'"
        )
        return {name for (name,) in await cur.fetchall()}


# Later migrations add tables of their own; these are the adapters' core.
CORE_TABLES = {
    "payment_events",
    "payment_payments",
    "payment_outbox",
    "payment_inbox",
    "payment_schema_migrations",
}


async def test_migrate_twice_applies_once(make_database: DatabaseFactory) -> None:
    url = make_database()
    everything = [m.version for m in available_migrations()]
    assert await migrate(url) == everything
    assert await migrate(url) == []
    assert await _tables(url) >= CORE_TABLES
    assert await _applied(url) == everything


async def test_concurrent_migrations_on_an_empty_database_both_succeed(
    make_database: DatabaseFactory,
) -> None:
    url = make_database()
    everything = [m.version for m in available_migrations()]
    results = await asyncio.gather(migrate(url), migrate(url), migrate(url))
    assert sorted(results) == [[], [], everything]
    assert await _tables(url) >= CORE_TABLES
    assert await _applied(url) == everything


async def test_a_changed_migration_is_refused(make_database: DatabaseFactory) -> None:
    url = make_database()
    await migrate(url)
    first = available_migrations()[0]
    edited = Migration(first.version, first.name, first.sql + "\n-- edited\n")
    conn = await connect_dedicated(url)
    async with conn:
        await conn.set_autocommit(False)
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await apply_migrations(conn, [edited])
