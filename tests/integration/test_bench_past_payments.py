"""bench/past_payments.py on the real PostgreSQL: the store a big-store bench starts from."""

from __future__ import annotations

import psycopg
import pytest

from payment.adapters.postgres.pool import Pool
from payment.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from support.bench_scripts import load_bench_script

past_payments = load_bench_script("past_payments")


@pytest.mark.parametrize("kind", ["v4", "v7"])
async def test_past_payments_fill_every_table_with_ids_of_their_kind(
    pg_pool: Pool, database_url: str, kind: str
) -> None:
    past_payments.write_past_payments(database_url, kind, 40, request_source="bench-e2e-x")

    with psycopg.connect(database_url) as conn:
        ids = [pid for (pid,) in conn.execute("SELECT payment_id FROM payment_payments")]
        events = conn.execute("SELECT count(*), count(DISTINCT stream_id) FROM payment_events")
        outbox = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE published_at IS NULL) FROM payment_outbox"
        )
        inbox = conn.execute("SELECT source, count(*) FROM payment_inbox GROUP BY source")
        assert events.fetchone() == (120, 40)
        assert outbox.fetchone() == (80, 0)
        assert dict(inbox.fetchall()) == {"bench-e2e-x": 40, "payment-service": 40}
        ordered = [
            pid
            for (pid,) in conn.execute(
                "SELECT payment_id FROM payment_payments ORDER BY created_at"
            )
        ]
    assert len(ids) == 40
    assert {pid.version for pid in ids} == {int(kind[1])}
    if kind == "v7":
        assert ordered == sorted(ordered)
    async with PostgresUnitOfWorkFactory(pg_pool)() as uow:
        assert await uow.payments.payment_for_booking("past-7") in ids


def test_an_unknown_kind_is_refused_before_writing(database_url: str) -> None:
    with pytest.raises(ValueError, match="unknown id kind 'v1'"):
        past_payments.write_past_payments(database_url, "v1", 10)
