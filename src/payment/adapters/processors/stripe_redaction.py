"""Keeping secrets out of what the Stripe adapter says: messages, codes and the SDK's logs.

A gateway's text may carry the API key, a payment method token or a card number; what
leaves the adapter (an event's decline message, a log line, an exception) is scrubbed,
and codes are kept only when they fit Stripe's snake_case vocabulary.
"""

from __future__ import annotations

import logging
import re
from typing import Final

import stripe

_REDACTIONS: Final = (
    (re.compile(r"\b[spr]k_(?:live|test)_[A-Za-z0-9]+"), "<redacted-key>"),
    # payment_method=… in logged form bodies, "payment_method": "…" in logged JSON.
    (re.compile(r"""(payment_method["']?\s*[:=]\s*["']?)[^"'&\s,}]+"""), r"\1<redacted>"),
    # Token-shaped ids (mixed case or digits, unlike codes such as card_declined).
    (re.compile(r"\b(?:pm|tok|src|card)_(?=[A-Za-z0-9_]*[0-9A-Z])[A-Za-z0-9_]{6,}"), "<redacted>"),
    (re.compile(r"\b\d{13,19}\b"), "<redacted-number>"),
)
_CODE: Final = re.compile(r"[a-z0-9_]{1,64}")
_REQUEST_ID: Final = re.compile(r"req_[A-Za-z0-9]{1,64}")


def scrub(text: str, *secrets: str) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text[:300]


def safe_code(code: str | None, default: str) -> str:
    # Codes become event fields and metric labels: only Stripe's snake_case vocabulary.
    return code if code is not None and _CODE.fullmatch(code) else default


class Secret:
    """A string that stays out of reprs, tracebacks' locals and `vars()` dumps."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "<redacted>"


class RedactStripeLogs(logging.Filter):
    """Scrubs the SDK's own log records, which carry form bodies and response bodies."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = None
        return True


def install_log_redaction() -> None:
    sdk_logger = logging.getLogger("stripe")
    if not any(isinstance(f, RedactStripeLogs) for f in sdk_logger.filters):
        sdk_logger.addFilter(RedactStripeLogs())


def describe(exc: stripe.StripeError) -> str:
    """Error type, HTTP status, Stripe code and request id: enough to debug, nothing secret."""
    parts = [type(exc).__name__]
    if exc.http_status is not None:
        parts.append(f"HTTP {exc.http_status}")
    if exc.code:
        parts.append(safe_code(exc.code, "?"))
    if exc.request_id and _REQUEST_ID.fullmatch(exc.request_id):
        parts.append(f"request {exc.request_id}")
    cause = exc.__cause__
    if cause is not None:
        parts.append(type(cause).__name__)
    return ", ".join(parts)
