"""Versioned SQL migrations shipped with the package, applied once each under a lock."""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from collections.abc import Sequence
from typing import NamedTuple

from psycopg import AsyncConnection

from payment.adapters.postgres.pool import Connection

# Arbitrary but fixed: every instance of the service must serialise on the same key.
MIGRATION_LOCK_KEY = int.from_bytes(b"pay-migr", "big")

_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")

_CREATE_TABLE = b"""
CREATE TABLE IF NOT EXISTS payment_schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    """The migration files or the database's migration history are inconsistent."""


class Migration(NamedTuple):
    """One `NNNN_name.sql` file of `payment/adapters/postgres/migrations`."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available_migrations() -> list[Migration]:
    """The packaged migrations in version order, numbered 1, 2, 3, … without a gap."""
    root = importlib.resources.files(__package__).joinpath("migrations")
    found: list[Migration] = []
    for entry in root.iterdir():
        match = _FILE_NAME.match(entry.name)
        if match is None:
            continue
        found.append(
            Migration(
                version=int(match["version"]),
                name=match["name"],
                sql=entry.read_text(encoding="utf-8"),
            )
        )
    found.sort()
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise MigrationError("migration versions must run 1, 2, 3, … without gaps or repeats")
    return found


async def migrate(url: str) -> list[int]:
    """Create or upgrade the schema at `url`; the versions applied now (empty if up to date).

    Idempotent, and safe when several instances run it at once: they queue on an advisory
    lock and each finds the work done by the one before.
    """
    async with await AsyncConnection.connect(url, autocommit=False) as conn:
        return await apply_migrations(conn)


async def apply_migrations(
    conn: Connection, migrations: Sequence[Migration] | None = None
) -> list[int]:
    """Apply the missing migrations in one transaction on `conn` (all of them, or none).

    Raises `MigrationError` if an applied migration's file has changed since: the schema
    would no longer be what the code expects.
    """
    wanted = available_migrations() if migrations is None else list(migrations)
    applied_now: list[int] = []
    async with conn.transaction():
        # Taken before anything else, the table creation included: two concurrent
        # CREATE TABLE IF NOT EXISTS can still collide on the catalog's unique index.
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        await conn.execute(_CREATE_TABLE)
        cur = await conn.execute("SELECT version, checksum FROM payment_schema_migrations")
        applied = {int(version): str(checksum) for version, checksum in await cur.fetchall()}
        for migration in wanted:
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} was changed "
                        "after it was applied; add a new migration instead"
                    )
                continue
            # No parameters: psycopg sends the file as one simple query, so it may hold
            # several statements.
            await conn.execute(migration.sql.encode(), prepare=False)
            await conn.execute(
                "INSERT INTO payment_schema_migrations (version, name, checksum)"
                " VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            applied_now.append(migration.version)
    return applied_now
