"""The prepared form of a write: placeholders numbered, a stable name, a bounded session."""

from __future__ import annotations

import pytest

from payment.adapters.postgres.prepared_writes import (
    MAX_PER_SESSION,
    NAME_PREFIX,
    PreparedWrite,
    SessionStatements,
    prepared_form,
)


def test_placeholders_are_numbered_and_the_values_stay_for_the_client_to_bind() -> None:
    form = prepared_form("INSERT INTO t (a, b) SELECT %s::uuid, %s WHERE c LIKE 'x%%'")
    assert form is not None
    assert form.name.startswith(NAME_PREFIX)
    assert form.prepare == (
        f"PREPARE {form.name} AS INSERT INTO t (a, b) SELECT $1::uuid, $2 WHERE c LIKE 'x%'"
    )
    assert form.execute == f"EXECUTE {form.name}(%s, %s)"


def test_the_name_is_the_statement_s_whatever_its_type_and_differs_between_statements() -> None:
    text = "UPDATE t SET a = %s WHERE b = %s"
    first, again = prepared_form(text), prepared_form(text.encode())
    other = prepared_form("UPDATE t SET a = %s WHERE c = %s")
    assert first is not None and again is not None and other is not None
    assert first.name == again.name != other.name
    assert len(first.name) <= 63  # PostgreSQL's identifier limit


@pytest.mark.parametrize(
    "query",
    [
        "BEGIN",  # no values
        "SELECT 100 %% 7",  # a literal percent sign only
        "DELETE FROM t WHERE a < %(before)s",  # named placeholders
        "INSERT INTO t VALUES (%b)",  # binary placeholder
    ],
)
def test_a_statement_without_positional_values_is_sent_as_it_is(query: str) -> None:
    assert prepared_form(query) is None


def _forms(count: int) -> list[PreparedWrite]:
    forms = [prepared_form(f"UPDATE t SET a = %s WHERE id = {n}") for n in range(count)]
    return [form for form in forms if form is not None]


def test_a_message_prepares_each_new_statement_once() -> None:
    a, b, c = _forms(3)
    chosen = SessionStatements().to_prepare({a.name}, [a, b, b, c, b])
    assert [form.name for form in chosen] == [b.name, c.name]


def test_a_session_prepares_no_more_than_its_bound() -> None:
    forms = _forms(MAX_PER_SESSION + 2)
    held = {form.name for form in forms[: MAX_PER_SESSION - 1]}
    chosen = SessionStatements().to_prepare(held, forms)
    assert chosen == [forms[MAX_PER_SESSION - 1]]
