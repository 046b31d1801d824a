"""Amounts in Stripe's own units: ISO 4217 minor units, converted exactly or refused."""

from __future__ import annotations

from typing import Final

from payment.domain.money import Money

# Stripe's zero-decimal currencies (docs.stripe.com/currencies#zero-decimal): the amount is
# in whole units. MGA is two-decimal in ISO 4217 but zero-decimal at Stripe.
STRIPE_ZERO_DECIMAL: Final = frozenset(
    {
        "BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA",
        "PYG", "RWF", "UGX", "VND", "VUV", "XAF", "XOF", "XPF",
    }
)  # fmt: skip
# Stripe accepts three decimals for these, but only with the last digit 0 (for its payment
# partners' sake): KWD 5.124 must be sent as 5120 or 5130, never 5124.
STRIPE_THREE_DECIMAL: Final = frozenset({"BHD", "JOD", "KWD", "OMR", "TND"})
# ISK is zero-decimal in ISO 4217 but, for backwards compatibility, two-decimal in Stripe's
# API with the fraction always 00 (5 ISK is sent as 500). HUF and TWD are two-decimal for
# charges (zero-decimal only for payouts), which is also ISO's exponent: no special case.
STRIPE_TWO_DECIMAL_WHOLE_UNITS: Final = frozenset({"ISK"})


class StripeAmountError(ValueError):
    """An amount that Stripe cannot represent exactly in its own units for the currency."""


def stripe_exponent(currency: str) -> int:
    """The number of decimals Stripe's API uses for `currency` (uppercase ISO 4217 code)."""
    if currency in STRIPE_ZERO_DECIMAL:
        return 0
    if currency in STRIPE_THREE_DECIMAL:
        return 3
    if currency in STRIPE_TWO_DECIMAL_WHOLE_UNITS:
        return 2
    return 2


def to_stripe_amount(money: Money) -> int:
    """`money` (ISO 4217 minor units) as Stripe's integer `amount` for its currency.

    Exact or not at all: raises `StripeAmountError` rather than round, because rounding a
    charge silently takes a different sum from the customer than the one they agreed to.
    """
    iso = money.exponent
    target = stripe_exponent(money.currency)
    if money.amount < 1:
        raise StripeAmountError("amount must be positive")
    if target >= iso:
        scale: int = 10 ** (target - iso)
        amount = money.amount * scale
    else:
        factor: int = 10 ** (iso - target)
        if money.amount % factor:
            raise StripeAmountError(
                f"{money.currency} is charged in whole units at Stripe: "
                f"{money.amount} minor units is not a multiple of {factor}"
            )
        amount = money.amount // factor
    if money.currency in STRIPE_THREE_DECIMAL and amount % 10:
        raise StripeAmountError(
            f"{money.currency} amounts at Stripe must end in 0: "
            f"{money.amount} minor units cannot be charged exactly"
        )
    # ISK whole units: after scaling by 100 the amount is always divisible by 100.
    return amount
