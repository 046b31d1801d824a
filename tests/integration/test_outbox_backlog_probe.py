"""The intake gate's probe on the real PostgreSQL: it counts unpublished outbox rows only,
never past its limit, through the partial index of unpublished rows, and feeds the gate."""

from __future__ import annotations

import functools

import psycopg
import pytest

from payment.adapters.kafka.consumer.intake_gate import OutboxBacklogGate
from payment.adapters.observability.metrics import Metrics
from payment.adapters.postgres.monitoring import _UNPUBLISHED_UP_TO, unpublished_outbox_rows
from payment.adapters.postgres.pool import Pool, open_pool


async def add_outbox_rows(pool: Pool, *, unpublished: int, published: int) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            """
            INSERT INTO payment_outbox (event_id, type, key, time, data, published_at)
            SELECT gen_random_uuid(), 'payment.failed', 'k', now(), '{}'::bytea,
                   CASE WHEN n > %s THEN now() END
            FROM generate_series(1, %s) AS n
            """,
            (unpublished, unpublished + published),
        )


async def test_the_probe_counts_unpublished_rows_up_to_its_limit(pg_pool: Pool) -> None:
    assert await unpublished_outbox_rows(pg_pool, 10) == 0

    await add_outbox_rows(pg_pool, unpublished=7, published=30)

    assert await unpublished_outbox_rows(pg_pool, 10) == 7  # published rows not counted
    assert await unpublished_outbox_rows(pg_pool, 7) == 7
    assert await unpublished_outbox_rows(pg_pool, 5) == 5  # capped at the limit


async def test_the_probe_reads_the_partial_index_of_unpublished_rows(pg_pool: Pool) -> None:
    await add_outbox_rows(pg_pool, unpublished=50, published=2000)
    async with pg_pool.connection() as conn:
        await conn.execute("ANALYZE payment_outbox")
        await conn.execute("SET enable_seqscan = off")  # the table is small here
        cur = await conn.execute(f"EXPLAIN {_UNPUBLISHED_UP_TO}", (2001,))
        plan = "\n".join(str(row[0]) for row in await cur.fetchall())
    assert "payment_outbox_unpublished_idx" in plan, plan
    assert "Limit" in plan, plan


async def test_the_gate_closes_and_reopens_on_the_databases_backlog(pg_pool: Pool) -> None:
    gate = OutboxBacklogGate.for_relay(
        functools.partial(unpublished_outbox_rows, pg_pool), 5, metrics=Metrics()
    )  # high 20, low 10
    await add_outbox_rows(pg_pool, unpublished=21, published=0)
    await gate.probe_once()
    assert not gate.admits_requests and gate.backlog == 21  # counted up to high + 1

    async with pg_pool.connection() as conn:
        await conn.execute(
            "UPDATE payment_outbox SET published_at = now() WHERE position IN"
            " (SELECT position FROM payment_outbox ORDER BY position LIMIT 12)"
        )
    await gate.probe_once()
    assert gate.admits_requests and gate.backlog == 9


async def test_the_probe_raises_when_the_database_is_gone(database_url: str) -> None:
    async with open_pool(database_url, min_size=1, max_size=1) as pool:
        pass  # closed
    with pytest.raises(psycopg.Error):
        await unpublished_outbox_rows(pool, 10)
