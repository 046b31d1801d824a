"""The array literals the adapters bind instead of lists read back as the same arrays."""

from __future__ import annotations

import uuid

import pytest
from psycopg import AsyncClientCursor

from payment.adapters.postgres.pool import Pool
from payment.adapters.postgres.rows import int_array, uuid_array

INTS = [[], [0], [1, -2, 9_223_372_036_854_775_807, -9_223_372_036_854_775_808]]


@pytest.mark.parametrize("values", INTS)
async def test_an_int_array_literal_is_the_array(pg_pool: Pool, values: list[int]) -> None:
    async with pg_pool.connection() as conn:
        # Bound on the client (the relay's marks) and as a prepared parameter (reads).
        client = AsyncClientCursor(conn)
        await client.execute("SELECT %s::bigint[]", (int_array(values),))
        assert await client.fetchone() == (values,)
        cur = await conn.execute("SELECT %s::bigint[]", (int_array(values),), prepare=True)
        assert await cur.fetchone() == (values,)


@pytest.mark.parametrize("count", [0, 1, 50])
async def test_a_uuid_array_literal_is_the_array(pg_pool: Pool, count: int) -> None:
    values = [uuid.uuid4() for _ in range(count)]
    async with pg_pool.connection() as conn:
        cur = await conn.execute("SELECT %s::uuid[]", (uuid_array(values),), prepare=True)
        assert await cur.fetchone() == (values,)
