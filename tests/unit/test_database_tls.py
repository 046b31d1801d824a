"""PostgreSQL over TLS: which URLs reach a remote server unencrypted, and what a refusal means."""

from __future__ import annotations

import logging

import psycopg
import pytest

from payment.adapters.postgres.connection_check import (
    DatabaseRejected,
    DatabaseUnreachable,
    classify,
    unencrypted_remote_hosts,
)


@pytest.fixture(autouse=True)
def _no_libpq_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGSSLMODE", raising=False)
    monkeypatch.delenv("PGHOST", raising=False)


@pytest.mark.parametrize(
    ("url", "hosts"),
    [
        ("postgresql://app:pw@db.example.com:5432/payments", ["db.example.com"]),
        ("postgresql://app@db.example.com/payments?sslmode=prefer", ["db.example.com"]),
        ("postgresql://app@10.0.0.5/payments?sslmode=disable", ["10.0.0.5"]),
        ("postgresql://app@db.example.com/payments?sslmode=allow", ["db.example.com"]),
        ("postgresql://app@a.example,127.0.0.1/p", ["a.example"]),
        ("postgresql://app@db.example.com/payments?sslmode=require", []),
        (
            "postgresql://app@db.example.com/p?sslmode=verify-full&sslrootcert=/etc/ca.pem",
            [],
        ),
        ("postgresql://root@127.0.0.1:5432/postgres", []),
        ("postgresql://root@localhost/postgres", []),
        ("postgresql://root@[::1]:5432/postgres", []),
        ("postgresql:///payments?host=/var/run/postgresql", []),
    ],
)
def test_remote_hosts_without_tls_are_found(url: str, hosts: list[str]) -> None:
    assert unencrypted_remote_hosts(url)[0] == hosts


def test_pgsslmode_counts_as_libpq_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSSLMODE", "verify-full")
    assert unencrypted_remote_hosts("postgresql://app@db.example.com/p") == ([], "verify-full")


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ('FATAL:  password authentication failed for user "app"', "password"),
        (
            "SSL error: certificate verify failed",
            "not signed by a CA in sslrootcert",
        ),
        (
            'server certificate for "localhost" does not match host name "127.0.0.1"',
            "does not name this host",
        ),
        ('root certificate file "/nope.pem" does not exist', "sslrootcert names no"),
        (
            'no pg_hba.conf entry for host "127.0.0.1", user "app", database "x", no encryption',
            "refuses this user, database or encryption",
        ),
    ],
)
def test_refusals_name_what_to_fix_without_quoting_libpq(message: str, expected: str) -> None:
    judged = classify(psycopg.OperationalError(f"connection failed: {message}"))
    assert isinstance(judged, DatabaseRejected)
    assert expected in str(judged)
    assert '"' not in str(judged)  # no user, host or path from the server's text


def test_no_answer_is_unreachable() -> None:
    judged = classify(psycopg.OperationalError("connection failed: Connection refused"))
    assert isinstance(judged, DatabaseUnreachable)


async def test_run_warns_about_a_remote_database_without_tls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from payment.runtime.preflight import check_postgres

    async def accepted(url: str) -> None:
        return None

    with caplog.at_level(logging.WARNING, logger="payment"):
        await check_postgres("postgresql://app:s3cret@db.example.com:5432/payments", accepted)
        await check_postgres(
            "postgresql://app:s3cret@db.example.com/p?sslmode=verify-full&sslrootcert=/ca.pem",
            accepted,
        )
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    text = warning.getMessage()
    assert "db.example.com is reached without TLS (sslmode=prefer)" in text
    assert "s3cret" not in text
