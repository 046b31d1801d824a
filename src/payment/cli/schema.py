"""`payment-service migrate [--check]`: create or upgrade the schema, or compare it."""

from __future__ import annotations

import sys

from payment.cli.common import require_database
from payment.settings import DependencyUnavailable, Settings


async def migrate(settings: Settings) -> int:
    from payment.adapters.postgres.migrations import MigrationError, migrate
    from payment.runtime.preflight import check_postgres

    url = require_database(settings)
    await check_postgres(url)  # a refused or unanswered connection: one line, exit 2 or 3
    try:
        applied = await migrate(url)
    except MigrationError as exc:
        raise DependencyUnavailable(f"database schema: {exc}") from exc
    if applied:
        print(f"migrate: applied {', '.join(f'{v:04d}' for v in applied)}")
    else:
        print("migrate: schema is up to date")
    return 0


async def check(settings: Settings) -> int:
    import psycopg

    from payment.adapters.postgres.migrations import check_schema

    try:
        result = await check_schema(require_database(settings))
    except psycopg.OperationalError as exc:
        # The type only: a connection error's text may quote the URL.
        print(f"migrate --check: cannot reach the database ({type(exc).__name__})", file=sys.stderr)
        return 1
    print(f"migrate --check: {result.line}", file=sys.stdout if result.agrees else sys.stderr)
    return 0 if result.agrees else 1
