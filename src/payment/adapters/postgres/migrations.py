"""Versioned SQL migrations shipped with the package, applied once each under a lock.

Each migration is either an *expand* step, which the previous release keeps running on
(new tables, new columns with defaults, new indexes), or a *contract* step, named
`NNNN_contract_*.sql`, which removes what the previous release still uses; a contract step
ships at least one release after the expand step that made it possible
(docs/operations.md, *Upgrading*). `check_schema` tells whether this code and a
database's schema agree.
"""

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

CONTRACT_PREFIX = "contract_"

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


class SchemaCheck(NamedTuple):
    """Whether the running code and the schema agree, in one line for an operator."""

    agrees: bool
    line: str


def compare_schema(
    applied: dict[int, tuple[str, str]] | None, code: Sequence[Migration]
) -> SchemaCheck:
    """Compare the applied migrations (version -> (name, checksum); None: no table) with
    the code's.

    They agree when every migration of the code is applied unchanged and whatever a later
    release applied beyond them is expand-only (no `contract_` step), so this code still
    runs on it.
    """
    latest = code[-1].version if code else 0

    def label(version: int, name: str) -> str:
        return f"{version:04d}_{name}"

    if not applied:
        return SchemaCheck(
            False,
            f"the database has no schema; this code needs {latest:04d}:"
            " run `payment-service migrate`",
        )
    for m in code:
        if m.version in applied and applied[m.version][1] != m.checksum:
            return SchemaCheck(
                False,
                f"migration {label(m.version, m.name)} was applied from another file than"
                " this code's: the schema is not what the code expects",
            )
    missing = [m for m in code if m.version not in applied]
    if missing:
        return SchemaCheck(
            False,
            f"the schema lacks {', '.join(label(m.version, m.name) for m in missing)}"
            " that this code needs: run `payment-service migrate`",
        )
    later = sorted(v for v in applied if v > latest)
    contracts = [v for v in later if applied[v][0].startswith(CONTRACT_PREFIX)]
    if contracts:
        return SchemaCheck(
            False,
            f"the schema has {label(contracts[0], applied[contracts[0]][0])}, a contract"
            f" step of a later release that this code (at {latest:04d}) cannot run on:"
            " upgrade the code",
        )
    if later:
        return SchemaCheck(
            True,
            f"schema at {later[-1]:04d}, ahead of this code ({latest:04d}) by expand-only"
            " migrations of a later release: compatible",
        )
    return SchemaCheck(True, f"schema at {latest:04d}, as this code expects")


async def check_schema(url: str) -> SchemaCheck:
    """`compare_schema` of the database at `url` and the packaged migrations (read only)."""
    async with await AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute("SELECT to_regclass('payment_schema_migrations') IS NOT NULL")
        row = await cur.fetchone()
        applied: dict[int, tuple[str, str]] | None = None
        if row is not None and row[0]:
            cur = await conn.execute(
                "SELECT version, name, checksum FROM payment_schema_migrations"
            )
            applied = {int(v): (str(n), str(c)) for v, n, c in await cur.fetchall()}
    return compare_schema(applied, available_migrations())
