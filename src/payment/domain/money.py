"""Money in integer minor units, and the ISO 4217 currencies the service accepts."""

from __future__ import annotations

import msgspec

from payment.domain.errors import InvalidMoney

# ISO 4217 alphabetic code -> minor-unit exponent (ISO's own, not a gateway's).
# The allowlist is deliberately finite: a code outside it is an invalid request.
CURRENCY_EXPONENTS: dict[str, int] = {
    "AED": 2,
    "AUD": 2,
    "BGN": 2,
    "BHD": 3,
    "BRL": 2,
    "CAD": 2,
    "CHF": 2,
    "CLP": 0,
    "CNY": 2,
    "COP": 2,
    "CZK": 2,
    "DKK": 2,
    "EGP": 2,
    "EUR": 2,
    "GBP": 2,
    "HKD": 2,
    "HUF": 2,
    "IDR": 2,
    "ILS": 2,
    "INR": 2,
    "ISK": 0,
    "JOD": 3,
    "JPY": 0,
    "KRW": 0,
    "KWD": 3,
    "MAD": 2,
    "MXN": 2,
    "MYR": 2,
    "NOK": 2,
    "NZD": 2,
    "OMR": 3,
    "PHP": 2,
    "PLN": 2,
    "QAR": 2,
    "RON": 2,
    "SAR": 2,
    "SEK": 2,
    "SGD": 2,
    "THB": 2,
    "TND": 3,
    "TRY": 2,
    "TWD": 2,
    "UAH": 2,
    "UGX": 0,
    "USD": 2,
    "VND": 0,
    "XAF": 0,
    "XOF": 0,
    "ZAR": 2,
}

DEFAULT_MAX_AMOUNT = 100_000_000


def currency_exponent(code: str) -> int:
    """The ISO 4217 minor-unit exponent of an allowlisted currency."""
    try:
        return CURRENCY_EXPONENTS[code]
    except KeyError:
        # The rejected value is not echoed: it is untrusted input and may carry anything.
        raise InvalidMoney("currency is not an accepted ISO 4217 code") from None


class Money(msgspec.Struct, frozen=True, kw_only=True):
    """An amount in the currency's minor unit (cents for EUR, yen for JPY)."""

    amount: int
    currency: str

    @classmethod
    def of(cls, amount: int, currency: str, *, max_amount: int = DEFAULT_MAX_AMOUNT) -> Money:
        """Validated constructor: positive integer amount within the limit, known currency."""
        # bool is an int subclass; True must not pass as a one-cent amount.
        if type(amount) is not int:
            raise InvalidMoney("amount must be an integer number of minor units")
        if amount < 1:
            raise InvalidMoney("amount must be at least 1 minor unit")
        if amount > max_amount:
            raise InvalidMoney(f"amount exceeds the maximum of {max_amount}")
        currency_exponent(currency)
        return cls(amount=amount, currency=currency)

    @property
    def exponent(self) -> int:
        return currency_exponent(self.currency)
