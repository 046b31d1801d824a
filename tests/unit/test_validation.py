"""The rules of contract section 3 for `saga.request_payment`, one by one and exhaustively."""

from __future__ import annotations

import re
import string
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from payment.application.commands import InboundRef, RequestPayment
from payment.application.validation import (
    Valid,
    looks_like_card_number,
    luhn_valid,
    validate_request,
)
from payment.domain.money import CURRENCY_EXPONENTS, DEFAULT_MAX_AMOUNT, Money

BOOKING_CHARSET = string.ascii_letters + string.digits + "._:-"
# Published test cards of Visa, Amex and Discover (never real cards).
TEST_CARDS = ["4242424242424242", "378282246310005", "6011111111111117"]


def request(**overrides: Any) -> RequestPayment:
    fields: dict[str, Any] = {
        "inbound": InboundRef(source="saga-orchestrator", message_id="m-1"),
        "booking_id": "BK-1001",
        "amount": 12_500,
        "currency": "EUR",
        "payment_method": "pm_card_visa",
        "customer_id": "cus_42",
        "saga_id": "saga-7",
    }
    fields.update(overrides)
    return RequestPayment(**fields)


def accepted(**overrides: Any) -> Valid:
    checked = validate_request(request(**overrides), max_amount=DEFAULT_MAX_AMOUNT)
    assert isinstance(checked, Valid), f"rejected: {checked}"
    return checked


def rejection(max_amount: int = DEFAULT_MAX_AMOUNT, **overrides: Any) -> str:
    checked = validate_request(request(**overrides), max_amount=max_amount)
    assert isinstance(checked, str), "accepted a request that breaks a rule"
    assert checked, "a rejection must say why"
    return checked


def luhn_check_digit(payload: str) -> str:
    """The digit that makes `payload + digit` Luhn-valid (an oracle independent of the code)."""
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return str((10 - total % 10) % 10)


def with_luhn(payload: str) -> str:
    return payload + luhn_check_digit(payload)


def without_luhn(payload: str) -> str:
    return payload + str((int(luhn_check_digit(payload)) + 1) % 10)


# -- a valid request ---------------------------------------------------------------------


def test_a_request_within_every_rule_is_valid_with_its_money_and_method() -> None:
    checked = accepted()

    assert checked.money == Money(amount=12_500, currency="EUR")
    assert checked.payment_method == "pm_card_visa"


def test_customer_id_and_saga_id_are_optional() -> None:
    accepted(customer_id=None, saga_id=None)


# -- booking_id ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "booking_id",
    ["a", "Z", "0", "BK-1001", "bk.2026:01_x-9", "a" * 64, BOOKING_CHARSET[:64], "...", "::"],
)
def test_a_booking_id_of_1_to_64_allowed_characters_is_valid(booking_id: str) -> None:
    accepted(booking_id=booking_id)


@pytest.mark.parametrize(
    "booking_id",
    [
        pytest.param("", id="empty"),
        pytest.param("a" * 65, id="65-chars"),
        pytest.param("BK 1001", id="space"),
        pytest.param("BK/1001", id="slash"),
        pytest.param("BK-1001\n", id="trailing-newline"),
        pytest.param("\nBK-1001", id="leading-newline"),
        pytest.param("BK\x001001", id="nul"),
        pytest.param("bü-1", id="non-ascii"),
        pytest.param("BK-\uff11", id="fullwidth-digit"),
        pytest.param("bk'; drop table", id="quote"),
    ],
)
def test_a_booking_id_outside_the_charset_or_length_is_rejected(booking_id: str) -> None:
    assert "booking_id" in rejection(booking_id=booking_id)


# Digit runs are kept short: a long digit run is the subject of the card-number tests.
_booking_ids = st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True).filter(
    lambda b: not any(run for run in _digit_runs(b) if len(run) >= 13)
)


def _digit_runs(text: str) -> list[str]:
    return "".join(c if c.isdigit() else " " for c in text).split()


@given(_booking_ids)
def test_any_booking_id_of_the_charset_is_valid(booking_id: str) -> None:
    accepted(booking_id=booking_id)


@given(
    st.text(min_size=1, max_size=80).filter(
        lambda b: len(b) > 64 or any(c not in BOOKING_CHARSET for c in b)
    )
)
def test_any_booking_id_breaking_the_rule_is_rejected(booking_id: str) -> None:
    assert "booking_id" in rejection(booking_id=booking_id)


@pytest.mark.parametrize("field", ["booking_id", "customer_id", "saga_id"])
def test_a_numeric_identifier_is_valid_even_if_luhn_valid(field: str) -> None:
    # The card rule is for payment_method only: numeric ids (snowflakes, say) are ids.
    accepted(**{field: with_luhn("123456789012345678")})


# -- amount --------------------------------------------------------------------------------


@pytest.mark.parametrize("amount", [1, 99, DEFAULT_MAX_AMOUNT])
def test_an_amount_from_1_to_max_amount_is_valid(amount: int) -> None:
    assert accepted(amount=amount).money.amount == amount


@pytest.mark.parametrize(
    "amount",
    [
        pytest.param(None, id="missing"),
        pytest.param(0, id="zero"),
        pytest.param(-1, id="negative"),
        pytest.param(DEFAULT_MAX_AMOUNT + 1, id="above-max"),
        pytest.param(True, id="bool-True"),
        pytest.param(False, id="bool-False"),
        pytest.param(100.0, id="float"),
        pytest.param(1.5, id="fractional"),
        pytest.param("100", id="string"),
    ],
)
def test_an_amount_that_is_missing_out_of_range_or_not_an_int_is_rejected(amount: object) -> None:
    assert "amount" in rejection(amount=amount)


def test_the_configured_max_amount_bounds_the_amount() -> None:
    assert isinstance(validate_request(request(amount=1_000), max_amount=1_000), Valid)
    rejection(max_amount=1_000, amount=1_001)


# -- currency ------------------------------------------------------------------------------


@pytest.mark.parametrize("currency", sorted(CURRENCY_EXPONENTS))
def test_every_allowlisted_currency_is_valid(currency: str) -> None:
    assert accepted(currency=currency).money.currency == currency


@pytest.mark.parametrize("currency", [None, "", "eur", "XXX", "EURO", "US", "BTC", " EUR"])
def test_a_currency_missing_or_outside_the_allowlist_is_rejected(currency: str | None) -> None:
    assert "currency" in rejection(currency=currency)


# -- payment_method ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method",
    ["t", "pm_card_visa", "tok_1NqXyZ2eZvKYlo2C", "x" * 255, "tok 4242", "123456789012"],
)
def test_a_gateway_token_of_1_to_255_characters_is_valid(method: str) -> None:
    assert accepted(payment_method=method).payment_method == method


@pytest.mark.parametrize("method", [None, "", "x" * 256])
def test_a_payment_method_missing_empty_or_too_long_is_rejected(method: str | None) -> None:
    assert "payment_method" in rejection(payment_method=method)


@pytest.mark.parametrize("card", TEST_CARDS)
def test_the_known_test_cards_are_luhn_valid(card: str) -> None:
    assert luhn_valid(card)
    assert luhn_check_digit(card[:-1]) == card[-1]


@pytest.mark.parametrize("number", ["4242424242424241", "378282246310006", "6011111111111110"])
def test_a_wrong_check_digit_is_not_luhn_valid(number: str) -> None:
    assert not luhn_valid(number)


@given(st.text(alphabet=string.digits, min_size=1, max_size=25))
def test_luhn_valid_agrees_with_an_independent_check(digits: str) -> None:
    assert luhn_valid(digits) == (luhn_check_digit(digits[:-1]) == digits[-1])


def _card_forms(card: str) -> list[str]:
    groups = [card[i : i + 4] for i in range(0, len(card), 4)]
    return [card, " ".join(groups), "-".join(groups), f"card {' '.join(groups)} exp 12/30"]


CARDS = [
    *TEST_CARDS,
    "4222222222222",  # Visa's 13-digit test card
    with_luhn("601100000000000000"),  # 19 digits
    with_luhn("37828224631000"),  # 15 digits
    "3782 822463 10005",  # Amex grouping
]


@pytest.mark.parametrize("method", [form for card in CARDS for form in _card_forms(card)])
def test_a_luhn_valid_13_to_19_digit_number_is_rejected_as_a_card(method: str) -> None:
    detail = rejection(payment_method=method)

    assert "card" in detail
    digits = "".join(c for c in method if c.isdigit())
    assert digits not in detail and method not in detail
    assert not any(group in detail for group in re.findall(r"[0-9]{4,}", method))


@given(
    length=st.integers(min_value=13, max_value=19),
    data=st.data(),
    separator=st.sampled_from(["", " ", "-"]),
)
def test_every_luhn_valid_number_of_13_to_19_digits_is_rejected(
    length: int, data: st.DataObject, separator: str
) -> None:
    payload = data.draw(st.text(alphabet=string.digits, min_size=length - 1, max_size=length - 1))
    card = with_luhn(payload)
    method = separator.join(card[i : i + 4] for i in range(0, len(card), 4))

    assert looks_like_card_number(method)
    assert "card" in rejection(payment_method=method)


@pytest.mark.parametrize(
    "number",
    [
        "1234567812345678",
        "4242424242424241",  # a Luhn-valid 15-digit window must not make it a card
        "1234567890123456",
    ],
)
def test_a_non_luhn_16_digit_number_is_not_a_card(number: str) -> None:
    assert not luhn_valid(number)

    assert accepted(payment_method=number).payment_method == number


@pytest.mark.parametrize(
    "method",
    [
        "4242424242424242 123",
        "4242 4242 4242 4242 123",
        "4242-4242-4242-4242-1230",
        "378282246310005 1234",
        "6011111111111117 12 30",
    ],
)
def test_a_card_number_followed_by_other_digit_groups_is_still_a_card(method: str) -> None:
    assert "card" in rejection(payment_method=method)


@given(st.text(alphabet=string.digits, min_size=15, max_size=15))
def test_every_non_luhn_16_digit_number_passes(payload: str) -> None:
    assert accepted(payment_method=without_luhn(payload))


@pytest.mark.parametrize("number", [with_luhn("1" * 11), with_luhn("12345678901"), "4242 4242"])
def test_a_luhn_valid_number_of_fewer_than_13_digits_is_not_a_card(number: str) -> None:
    assert luhn_valid(number.replace(" ", ""))

    accepted(payment_method=number)


# -- customer_id and saga_id ------------------------------------------------------------------


@pytest.mark.parametrize("field", ["customer_id", "saga_id"])
@pytest.mark.parametrize("value", ["", "c", "c" * 64])
def test_an_optional_id_of_at_most_64_characters_is_valid(field: str, value: str) -> None:
    accepted(**{field: value})


@pytest.mark.parametrize("field", ["customer_id", "saga_id"])
def test_an_optional_id_longer_than_64_characters_is_rejected(field: str) -> None:
    assert field in rejection(**{field: "c" * 65})


# -- the rejection never repeats what it rejects ------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "offending"),
    [
        ({"booking_id": "bad booking qz7"}, "bad booking qz7"),
        ({"booking_id": "Q" * 65}, "Q" * 65),
        ({"amount": 100_000_123}, "100000123"),
        ({"amount": -4_711}, "4711"),
        ({"amount": "4711"}, "4711"),
        ({"currency": "QZX"}, "QZX"),
        ({"payment_method": "P" * 256}, "P" * 256),
        ({"payment_method": "4242 4242 4242 4242"}, "4242"),
        ({"payment_method": "tok_378282246310005"}, "378282246310005"),
        ({"customer_id": "K" * 65}, "K" * 65),
        ({"saga_id": "S" * 65}, "S" * 65),
    ],
)
def test_the_rejection_detail_never_contains_the_offending_value(
    overrides: dict[str, Any], offending: str
) -> None:
    assert offending not in rejection(**overrides)


@given(
    field=st.sampled_from(["booking_id", "payment_method", "currency", "customer_id", "saga_id"]),
    # A distinctive prefix, so that an echo cannot hide among the detail's own words.
    value=st.text(max_size=300).map(lambda text: "Qz7" + text),
)
def test_no_rejection_detail_echoes_the_value_given(field: str, value: str) -> None:
    checked = validate_request(request(**{field: value}), max_amount=DEFAULT_MAX_AMOUNT)
    if isinstance(checked, str):
        assert value not in checked
