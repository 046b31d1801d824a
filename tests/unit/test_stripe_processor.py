"""Pure parts of the Stripe adapter: amounts in Stripe's units, and the start-up key check."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from payment.adapters.processors.stripe import (
    STRIPE_THREE_DECIMAL,
    STRIPE_ZERO_DECIMAL,
    StripeAmountError,
    stripe_exponent,
    to_stripe_amount,
    validate_stripe_key,
)
from payment.domain.money import CURRENCY_EXPONENTS, Money


@pytest.mark.parametrize(
    ("amount", "currency", "expected"),
    [
        (1000, "EUR", 1000),
        (1, "USD", 1),
        (500, "JPY", 500),
        (7, "KRW", 7),
        (70000, "UGX", 70000),
        (15, "XOF", 15),
        (5, "ISK", 500),  # ISO 0 decimals; Stripe 2, with 00
        (12345, "HUF", 12345),  # two decimals for charges at Stripe and in ISO
        (9999, "TWD", 9999),
        (5120, "KWD", 5120),  # three decimals, last digit 0
        (1000, "BHD", 1000),
        (10, "OMR", 10),
    ],
)
def test_to_stripe_amount(amount: int, currency: str, expected: int) -> None:
    assert to_stripe_amount(Money.of(amount, currency)) == expected


@pytest.mark.parametrize(("amount", "currency"), [(5124, "KWD"), (1, "JOD"), (99999, "TND")])
def test_three_decimal_amounts_must_end_in_zero(amount: int, currency: str) -> None:
    with pytest.raises(StripeAmountError, match="must end in 0"):
        to_stripe_amount(Money.of(amount, currency))


def test_iso_two_decimal_but_stripe_zero_decimal_needs_whole_units(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # MGA (not on the allowlist yet): ISO says two decimals, Stripe charges whole ariary.
    monkeypatch.setitem(CURRENCY_EXPONENTS, "MGA", 2)
    assert to_stripe_amount(Money(amount=1200, currency="MGA")) == 12
    with pytest.raises(StripeAmountError, match="whole units"):
        to_stripe_amount(Money(amount=1250, currency="MGA"))


def test_exponents() -> None:
    assert {stripe_exponent(c) for c in STRIPE_ZERO_DECIMAL} == {0}
    assert {stripe_exponent(c) for c in STRIPE_THREE_DECIMAL} == {3}
    assert stripe_exponent("ISK") == stripe_exponent("EUR") == 2


@given(
    currency=st.sampled_from(sorted(CURRENCY_EXPONENTS)),
    amount=st.integers(min_value=1, max_value=100_000_000),
)
def test_conversion_is_exact_or_refused(currency: str, amount: int) -> None:
    money = Money.of(amount, currency)
    try:
        converted = to_stripe_amount(money)
    except StripeAmountError:
        assert currency in STRIPE_THREE_DECIMAL and amount % 10
        return
    same_value = Fraction(converted, 10 ** stripe_exponent(currency)) == Fraction(
        amount, 10**money.exponent
    )
    assert same_value


@pytest.mark.parametrize(
    ("kind", "key"),
    [
        ("sandbox", "sk_test_abc123"),
        ("sandbox", "rk_test_abc123"),
        ("stripe", "sk_live_abc123"),
        ("stripe", "rk_live_abc123"),
    ],
)
def test_accepted_keys(kind: str, key: str) -> None:
    validate_stripe_key(kind, key)


@pytest.mark.parametrize(
    ("kind", "key", "reason"),
    [
        ("sandbox", "sk_live_s3cr3tValue", "test-mode key"),
        ("sandbox", "whatever_s3cr3tValue", "test-mode key"),
        ("stripe", "sk_test_s3cr3tValue", "is a test-mode key"),
        ("stripe", "rk_test_s3cr3tValue", "is a test-mode key"),
        ("stripe", "nonsense_s3cr3tValue", "not a Stripe secret"),
        ("stripe", "pk_live_s3cr3tValue", "publishable"),
        ("sandbox", "sk_test_s3cr3tValue\n", "whitespace"),
        ("stripe", "", "is required"),
        ("stripe", None, "is required"),
    ],
)
def test_refused_keys_name_the_variable_and_never_echo_the_key(
    kind: str, key: str | None, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason) as refused:
        validate_stripe_key(kind, key)
    message = str(refused.value)
    assert "PAYMENT_STRIPE_API_KEY" in message
    assert "s3cr3t" not in message
    assert "\n" not in message


def test_a_kind_without_a_stripe_key_is_refused() -> None:
    with pytest.raises(ValueError, match="PAYMENT_PROCESSOR"):
        validate_stripe_key("fake", "sk_test_abc")
