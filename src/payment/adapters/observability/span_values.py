"""Untrusted text made fit for a span attribute: card numbers masked, length bounded.

A span leaves the process (an OTLP collector, a console) and is kept by systems that
hold no card data and expect small values, while the ids it is tagged with come from
the sender unvalidated: a `booking_id` of up to 64 KiB, any `ce_id` or `ce_source`.
Card numbers are masked first (contract 3: never published), so that cutting the text
cannot leave a shortened number the check no longer sees; then it is cut to
`MAX_ATTRIBUTE_CHARS`, marked with a trailing ellipsis. Control characters are escaped,
so an exporter's line-based output cannot be forged.
"""

from __future__ import annotations

import re
from typing import Final

from payment.application.validation import CARD_MASK, mask_card_numbers

MAX_ATTRIBUTE_CHARS: Final = 128
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_TAIL_DIGITS: Final = re.compile(r"[0-9][0-9 -]*$")


def untrusted_attribute(text: str, limit: int = MAX_ATTRIBUTE_CHARS) -> str:
    """`text` as a span attribute value: card numbers masked, control characters escaped,
    at most `limit` characters."""
    # Only the head is kept: masking a 64 KiB value would cost more than the span.
    head = text[: limit * 4]
    safe = mask_card_numbers(head)
    if len(head) < len(text):
        # The cut may have split a card number: mask what is left of one at the end.
        safe = _mask_tail(safe)
    safe = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", safe)
    if len(safe) <= limit and len(head) == len(text):
        return safe
    return safe[: limit - 1] + "…"


def _mask_tail(text: str) -> str:
    """Digits (and separators) at the very end of a cut text, masked whatever their count:
    they may be the first part of a card number that continued past the cut."""
    match = _TAIL_DIGITS.search(text)
    if match is None or len(match.group()) < 4:
        return text
    return text[: match.start()] + CARD_MASK
