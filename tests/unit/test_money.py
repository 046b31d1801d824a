"""Money: integer minor units within bounds, and the ISO 4217 allowlist (contract section 3)."""

from __future__ import annotations

from decimal import Decimal

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from payment.domain.errors import InvalidMoney
from payment.domain.money import (
    CURRENCY_EXPONENTS,
    DEFAULT_MAX_AMOUNT,
    Money,
    currency_exponent,
)


def test_the_default_maximum_is_the_contract_default() -> None:
    assert DEFAULT_MAX_AMOUNT == 100_000_000


@pytest.mark.parametrize("amount", [1, 2, 12_345, DEFAULT_MAX_AMOUNT - 1, DEFAULT_MAX_AMOUNT])
def test_an_amount_from_one_to_the_maximum_is_accepted(amount: int) -> None:
    money = Money.of(amount, "EUR")

    assert money == Money(amount=amount, currency="EUR")


@pytest.mark.parametrize("amount", [0, -1, -DEFAULT_MAX_AMOUNT, DEFAULT_MAX_AMOUNT + 1, 10**30])
def test_an_amount_outside_one_to_the_maximum_is_rejected(amount: int) -> None:
    with pytest.raises(InvalidMoney):
        Money.of(amount, "EUR")


def test_a_configured_maximum_replaces_the_default() -> None:
    assert Money.of(500, "EUR", max_amount=500).amount == 500
    with pytest.raises(InvalidMoney):
        Money.of(501, "EUR", max_amount=500)


@given(st.integers(min_value=1, max_value=DEFAULT_MAX_AMOUNT))
def test_every_amount_within_bounds_is_accepted(amount: int) -> None:
    assert Money.of(amount, "USD").amount == amount


@given(st.integers().filter(lambda n: not 1 <= n <= DEFAULT_MAX_AMOUNT))
def test_every_amount_out_of_bounds_is_rejected(amount: int) -> None:
    with pytest.raises(InvalidMoney):
        Money.of(amount, "USD")


@pytest.mark.parametrize(
    "amount",
    [
        pytest.param(True, id="bool-True"),  # bool is an int subclass: it must not pass as 1
        pytest.param(False, id="bool-False"),
        pytest.param(1.0, id="float"),
        pytest.param(100.5, id="fractional-float"),
        pytest.param("100", id="string"),
        pytest.param(Decimal(100), id="decimal"),
        pytest.param(None, id="none"),
    ],
)
def test_an_amount_that_is_not_an_int_is_rejected(amount: object) -> None:
    with pytest.raises(InvalidMoney):
        Money.of(amount, "EUR")  # type: ignore[arg-type]


@pytest.mark.parametrize("code", sorted(CURRENCY_EXPONENTS))
def test_every_allowlisted_currency_is_accepted(code: str) -> None:
    assert Money.of(100, code).currency == code


@pytest.mark.parametrize(
    "code", ["eur", "Eur", "XXX", "XTS", "EURO", "EU", "", " EUR", "EUR ", "€", "BTC"]
)
def test_a_currency_outside_the_allowlist_is_rejected(code: str) -> None:
    with pytest.raises(InvalidMoney):
        Money.of(100, code)
    with pytest.raises(InvalidMoney):
        currency_exponent(code)


@given(st.text(max_size=8).filter(lambda code: code not in CURRENCY_EXPONENTS))
def test_any_other_text_is_not_a_currency(code: str) -> None:
    with pytest.raises(InvalidMoney):
        Money.of(100, code)


def test_the_allowlist_holds_uppercase_iso_codes_with_iso_exponents() -> None:
    for code, exponent in CURRENCY_EXPONENTS.items():
        assert len(code) == 3 and code.isascii() and code.isalpha() and code.isupper(), code
        assert exponent in (0, 2, 3), code


@pytest.mark.parametrize(
    ("code", "exponent"),
    [
        ("EUR", 2),
        ("USD", 2),
        ("GBP", 2),
        ("JPY", 0),
        ("KRW", 0),
        ("CLP", 0),
        ("ISK", 0),
        ("BHD", 3),
        ("KWD", 3),
        ("JOD", 3),
        ("OMR", 3),
        ("TND", 3),
    ],
)
def test_the_exponent_is_iso_4217s_minor_unit(code: str, exponent: int) -> None:
    assert currency_exponent(code) == exponent
    assert Money.of(1, code).exponent == exponent


@pytest.mark.parametrize(
    ("amount", "currency", "offending"),
    [
        (DEFAULT_MAX_AMOUNT + 7, "EUR", str(DEFAULT_MAX_AMOUNT + 7)),
        (-987_654, "EUR", "987654"),
        (100, "QZX", "QZX"),
        (100, "zzz", "zzz"),
    ],
)
def test_the_error_never_echoes_the_offending_value(
    amount: int, currency: str, offending: str
) -> None:
    with pytest.raises(InvalidMoney) as caught:
        Money.of(amount, currency)

    assert offending not in str(caught.value)


def test_money_is_an_immutable_value() -> None:
    money = Money.of(100, "EUR")

    assert money == Money.of(100, "EUR")
    assert money != Money.of(100, "USD")
    assert money != Money.of(101, "EUR")
    with pytest.raises(AttributeError):
        money.amount = 200  # type: ignore[misc]
    assert msgspec.json.decode(msgspec.json.encode(money), type=Money) == money
