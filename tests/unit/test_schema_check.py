"""`migrate --check`'s verdict: when the running code and a database's schema agree."""

from __future__ import annotations

from payment.adapters.postgres.migrations import Migration, compare_schema

CODE = [
    Migration(1, "initial", "CREATE TABLE a (x int);"),
    Migration(2, "retention", "CREATE INDEX a_x ON a (x);"),
]


def applied(*migrations: Migration, **extra: str) -> dict[int, tuple[str, str]]:
    rows = {m.version: (m.name, m.checksum) for m in migrations}
    for label, name in extra.items():
        rows[int(label.removeprefix("v"))] = (name, "later-release")
    return rows


def test_every_migration_applied_agrees() -> None:
    check = compare_schema(applied(*CODE), CODE)
    assert check.agrees
    assert check.line == "schema at 0002, as this code expects"


def test_no_schema_disagrees_and_says_to_migrate() -> None:
    for nothing in (None, {}):
        check = compare_schema(nothing, CODE)
        assert not check.agrees
        assert "run `payment-service migrate`" in check.line


def test_a_missing_migration_is_named() -> None:
    check = compare_schema(applied(CODE[0]), CODE)
    assert not check.agrees
    assert check.line == (
        "the schema lacks 0002_retention that this code needs: run `payment-service migrate`"
    )


def test_a_migration_applied_from_another_file_disagrees() -> None:
    edited = Migration(2, "retention", "CREATE INDEX a_x ON a (x DESC);")
    check = compare_schema(applied(CODE[0], edited), CODE)
    assert not check.agrees
    assert "0002_retention was applied from another file" in check.line


def test_later_expand_steps_are_compatible() -> None:
    # The previous release during a rolling upgrade: the new one already migrated.
    check = compare_schema(applied(*CODE, v3="schema_versions", v4="more_indexes"), CODE)
    assert check.agrees
    assert "ahead of this code (0002)" in check.line and "0004" in check.line


def test_a_later_contract_step_disagrees() -> None:
    check = compare_schema(applied(*CODE, v3="widen", v4="contract_drop_x"), CODE)
    assert not check.agrees
    assert "0004_contract_drop_x" in check.line and "upgrade the code" in check.line


def test_each_verdict_is_one_line() -> None:
    for rows in (None, applied(CODE[0]), applied(*CODE), applied(*CODE, v3="contract_x")):
        assert "\n" not in compare_schema(rows, CODE).line
