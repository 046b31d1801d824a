"""What the Stripe adapter is configured with, checked at start-up: key and API address.

A wrong key fails the start in one line naming the variable; the key itself is never part
of a message.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit

API_KEY_VARIABLE: Final = "PAYMENT_STRIPE_API_KEY"
API_BASE_VARIABLE: Final = "PAYMENT_STRIPE_API_BASE"

_TEST_KEY_PREFIXES: Final = ("sk_test_", "rk_test_")
_LIVE_KEY_PREFIXES: Final = ("sk_live_", "rk_live_")


def validate_stripe_key(processor_kind: str, api_key: str | None) -> None:
    """Refuse a key that does not fit the processor kind, in one line naming the variable.

    `sandbox` needs a test-mode secret or restricted key; `stripe` refuses a test-mode key
    (a live service charging nobody is an outage nobody notices). The key itself is never
    part of the message.
    """
    if processor_kind not in ("stripe", "sandbox"):
        raise ValueError(f"PAYMENT_PROCESSOR={processor_kind!r} does not use a Stripe key")
    if not api_key:
        raise ValueError(f"{API_KEY_VARIABLE} is required when PAYMENT_PROCESSOR={processor_kind}")
    if api_key != api_key.strip() or any(ch.isspace() for ch in api_key):
        raise ValueError(f"{API_KEY_VARIABLE} contains whitespace; check how it is set")
    if api_key.startswith(("pk_test_", "pk_live_")):
        raise ValueError(
            f"{API_KEY_VARIABLE} is a publishable key; the service needs a secret (sk_) "
            "or restricted (rk_) key"
        )
    if processor_kind == "sandbox":
        if not api_key.startswith(_TEST_KEY_PREFIXES):
            raise ValueError(
                f"{API_KEY_VARIABLE} must be a test-mode key (sk_test_… or rk_test_…) "
                "when PAYMENT_PROCESSOR=sandbox"
            )
        return
    if api_key.startswith(_TEST_KEY_PREFIXES):
        raise ValueError(
            f"{API_KEY_VARIABLE} is a test-mode key but PAYMENT_PROCESSOR=stripe charges for "
            "real: use a live key (sk_live_… or rk_live_…) or PAYMENT_PROCESSOR=sandbox"
        )
    if not api_key.startswith(_LIVE_KEY_PREFIXES):
        raise ValueError(
            f"{API_KEY_VARIABLE} is not a Stripe secret or restricted key (sk_live_… or rk_live_…)"
        )


def check_api_base(processor_kind: str, api_base: str | None) -> None:
    if api_base is None:
        return
    parts = urlsplit(api_base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{API_BASE_VARIABLE} must be an http(s)://host[:port] URL")
    if processor_kind == "stripe" and parts.scheme != "https":
        # A live key in clear text is a leaked key.
        raise ValueError(f"{API_BASE_VARIABLE} must use https with PAYMENT_PROCESSOR=stripe")


def origin(api_base: str | None) -> str:
    # scheme://host:port only: a URL may carry credentials, which must not be logged.
    if api_base is None:
        return "https://api.stripe.com"
    parts = urlsplit(api_base)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"
