"""`payment-service migrate --check` against a real PostgreSQL: exit code and one line."""

from __future__ import annotations

import psycopg
import pytest

from payment.adapters.postgres.migrations import available_migrations
from payment.cli import main


def check(
    url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[str]]:
    monkeypatch.setenv("PAYMENT_DATABASE_URL", url)
    code = main(["migrate", "--check"])
    out, err = capsys.readouterr()
    return code, (out + err).splitlines()


def test_check_follows_the_schema_through_migrate(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    latest = available_migrations()[-1]
    code, lines = check(database_url, monkeypatch, capsys)
    assert code == 1
    assert lines == [
        f"migrate --check: the database has no schema; this code needs {latest.version:04d}:"
        " run `payment-service migrate`"
    ]

    monkeypatch.setenv("PAYMENT_DATABASE_URL", database_url)
    assert main(["migrate"]) == 0
    capsys.readouterr()
    assert check(database_url, monkeypatch, capsys) == (
        0,
        [f"migrate --check: schema at {latest.version:04d}, as this code expects"],
    )

    # The schema a release before this one left: this code's last migration not applied.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM payment_schema_migrations WHERE version = %s", (latest.version,))
    code, lines = check(database_url, monkeypatch, capsys)
    assert code == 1
    assert len(lines) == 1
    assert f"{latest.version:04d}_{latest.name}" in lines[0]


def test_check_changes_nothing(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    check(database_url, monkeypatch, capsys)
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT to_regclass('payment_schema_migrations')").fetchone()
    assert row == (None,)


def test_an_unreachable_database_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = check("postgresql://nobody:secret@127.0.0.1:9/none", monkeypatch, capsys)
    assert code == 1
    assert lines == ["migrate --check: cannot reach the database (OperationalError)"]
