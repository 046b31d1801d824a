"""PostgreSQL for tests: a server to use, and throwaway databases created on it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from payment.devtools.embedded import EmbeddedPostgres

from .broker import docker_engine_available

DATABASE_ENV_VAR = "PAYMENT_TEST_DATABASE_URL"
POSTGRES_IMAGE = "postgres:16-alpine"
# Tried in order; `root` is the OS user here, `postgres` the superuser role of a stock
# installation, and the first one allowed to create databases wins.
LOCAL_SERVER_URLS = (
    "postgresql://root@127.0.0.1:5432/postgres",
    "postgresql://postgres@127.0.0.1:5432/postgres",
)


def with_database(url: str, database: str) -> str:
    """The same server and credentials as `url`, pointing at `database`."""
    if "://" in url:
        return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))
    return make_conninfo(url, dbname=database)


def _can_create_databases(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            row = conn.execute(
                "SELECT rolsuper OR rolcreatedb FROM pg_roles WHERE rolname = current_user"
            ).fetchone()
    except psycopg.Error:
        return False
    return row is not None and bool(row[0])


@contextlib.contextmanager
def _postgres_container() -> Iterator[str]:
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:
        from testcontainers.postgres import PostgresContainer

    with PostgresContainer(POSTGRES_IMAGE, driver=None) as container:
        yield container.get_connection_url()


@contextlib.contextmanager
def _embedded_server() -> Iterator[str]:
    root = Path(tempfile.mkdtemp(prefix="payment-test-pg-"))
    try:
        with EmbeddedPostgres(root / "data", fresh=True) as server:
            yield server.url
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _testcontainers_installed() -> bool:
    try:
        import testcontainers  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Yield the URL of a PostgreSQL server whose role may create databases.

    In order: `$PAYMENT_TEST_DATABASE_URL`; a testcontainers PostgreSQL when a Docker
    engine answers; the local server on 127.0.0.1:5432 (as `root`, else `postgres`);
    else an `EmbeddedPostgres` in a temporary directory, removed on exit.
    """
    configured = os.environ.get(DATABASE_ENV_VAR, "").strip()
    if configured:
        yield configured
        return
    if _testcontainers_installed() and docker_engine_available():
        with _postgres_container() as url:
            yield url
        return
    for url in LOCAL_SERVER_URLS:
        if _can_create_databases(url):
            yield url
            return
    with _embedded_server() as url:
        yield url


@contextlib.contextmanager
def fresh_database(server_url: str, *, prefix: str = "payment_test") -> Iterator[str]:
    """Create a uniquely named empty database on the server, yield its URL, drop it.

    Only the database created here is dropped, with FORCE so that a connection a test
    leaked cannot keep it alive.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(statement)
    try:
        yield with_database(server_url, name)
    finally:
        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(drop)


@contextlib.contextmanager
def temporary_database(*, prefix: str = "payment_test") -> Iterator[str]:
    """`fresh_database` on the server `postgres_server` picks: one call, no fixtures."""
    with postgres_server() as server_url, fresh_database(server_url, prefix=prefix) as url:
        yield url
