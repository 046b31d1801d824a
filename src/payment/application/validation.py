"""Rules of contract section 3 for `saga.request_payment` and `saga.refund_payment`."""

from __future__ import annotations

import re

from payment.application.commands import RefundPayment, RequestPayment
from payment.domain.errors import InvalidMoney
from payment.domain.money import Money
from payment.domain.redaction import REDACTED_CARD

_BOOKING_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# A digit, or a JSON escape of one (`\u0034` is "4" once decoded: raw bytes such as a dead
# letter's value hold card numbers written so); a separator: space or dash, or theirs.
_DIGIT = r"(?:[0-9]|\\u003[0-9])"
_SEPARATOR = r"(?:[ -]|\\u00(?:20|2[dD]))"
_CARD_LIKE = re.compile(rf"{_DIGIT}(?:{_DIGIT}|{_SEPARATOR})*{_DIGIT}")
_ESCAPED = re.compile(r"\\u00(3[0-9]|20|2[dD])")
_SEPARATORS = re.compile(r"[ -]+")
# Every text `mask_card_numbers` changes holds a match: one cheap search clears most texts.
_CANDIDATE = re.compile(r"[0-9][0-9 -]{11,}[0-9]|\\u00(?:3[0-9]|20|2[dD])")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a string of decimal digits."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def looks_like_card_number(text: str) -> bool:
    """True if `text` contains a 13-19 digit Luhn-valid number (spaces and dashes allowed,
    digits and separators also as JSON `\\u` escapes).

    A run of digit groups is judged by its consecutive whole groups: a card number
    followed by a CVC or an expiry date is still a card, while an unbroken longer number
    is not one just because some stretch of it passes the checksum.
    """
    if _CANDIDATE.search(text) is None:
        return False
    for match in _CARD_LIKE.finditer(text):
        groups = _SEPARATORS.split(_unescaped(match.group()))
        for first in range(len(groups)):
            digits = ""
            for group in groups[first:]:
                digits += group
                if len(digits) > 19:
                    break
                if len(digits) >= 13 and luhn_valid(digits):
                    return True
    return False


def might_hold_card_number(text: str) -> bool:
    """A cheap first look: False means `text` holds no card number for certain."""
    return _CANDIDATE.search(text) is not None


def _unescaped(run: str) -> str:
    """A digit run with its JSON escapes (digits, space, dash) decoded."""
    if "\\" not in run:
        return run
    return _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), run)


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# The card marker under the name its callers know (payment.domain.redaction).
CARD_MASK = REDACTED_CARD


def echo_safe(text: str) -> str:
    """Untrusted text fit to echo in an event: card numbers masked, NULs replaced."""
    return mask_card_numbers(text).replace("\x00", "\ufffd")


def mask_card_numbers(text: str) -> str:
    """`text` with each digit run holding a card number replaced by `CARD_MASK`.

    UUIDs are kept as they are: their digit groups can pass the checksum by chance, and
    ids are what a reader correlates on.
    """
    if not looks_like_card_number(text):
        return text

    def mask(match: re.Match[str]) -> str:
        return CARD_MASK if looks_like_card_number(match.group()) else match.group()

    pieces: list[str] = []
    last = 0
    for uuid_match in _UUID.finditer(text):
        pieces.append(_CARD_LIKE.sub(mask, text[last : uuid_match.start()]))
        pieces.append(uuid_match.group())
        last = uuid_match.end()
    pieces.append(_CARD_LIKE.sub(mask, text[last:]))
    return "".join(pieces)


def well_formed_booking_id(booking_id: str) -> bool:
    """True if `booking_id` follows contract section 3 (only such a booking has a payment)."""
    return _BOOKING_ID.fullmatch(booking_id) is not None


class Valid:
    """A request that passed every rule: its money, and what of it may be stored.

    `customer_id` and `saga_id` are free-form ids echoed on every outcome: a card number
    in them (contract 3: never stored or published) is masked, as in a rejection, so the
    same id reads the same on every event of the booking. A numeric id that happens to
    pass the checksum is masked too; the request is not refused for it.
    """

    __slots__ = ("customer_id", "money", "payment_method", "saga_id")

    def __init__(
        self,
        money: Money,
        payment_method: str,
        customer_id: str | None = None,
        saga_id: str | None = None,
    ) -> None:
        self.money = money
        self.payment_method = payment_method
        self.customer_id = customer_id
        self.saga_id = saga_id


def validate_request(cmd: RequestPayment, *, max_amount: int) -> Valid | str:
    """The validated request, or a human-readable reason (never echoing secrets) it breaks."""
    if not well_formed_booking_id(cmd.booking_id):
        return "booking_id must be 1-64 characters of A-Z a-z 0-9 . _ : -"
    if cmd.amount is None:
        return "amount is required"
    if cmd.currency is None:
        return "currency is required"
    try:
        money = Money.of(cmd.amount, cmd.currency, max_amount=max_amount)
    except InvalidMoney as exc:
        return str(exc)
    method = cmd.payment_method
    if method is None or not 1 <= len(method) <= 255:
        return "payment_method is required: a gateway token of 1-255 characters"
    if looks_like_card_number(method):
        return "payment_method looks like a card number: send a gateway token, never card data"
    if any("\x00" in text for text in (method, cmd.customer_id or "", cmd.saga_id or "")):
        # Valid JSON, but no PostgreSQL text or jsonb value can hold it.
        return "payment_method, customer_id and saga_id must not contain NUL characters"
    if cmd.customer_id is not None and len(cmd.customer_id) > 64:
        return "customer_id must be at most 64 characters"
    if cmd.saga_id is not None and len(cmd.saga_id) > 64:
        return "saga_id must be at most 64 characters"
    return Valid(
        money,
        method,
        customer_id=None if cmd.customer_id is None else mask_card_numbers(cmd.customer_id),
        saga_id=None if cmd.saga_id is None else mask_card_numbers(cmd.saga_id),
    )


def validate_refund(cmd: RefundPayment, *, max_amount: int) -> str | None:
    """None for a refund request that keeps the rules, else why not (never echoing secrets).

    Whether its amount is still refundable is the payment's to decide.
    """
    if not _BOOKING_ID.fullmatch(cmd.booking_id):
        return "booking_id must be 1-64 characters of A-Z a-z 0-9 . _ : -"
    if cmd.amount is not None and not 1 <= cmd.amount <= max_amount:
        return f"amount must be between 1 and {max_amount}"
    if cmd.reason is not None:
        if len(cmd.reason) > 255:
            return "reason must be at most 255 characters"
        if looks_like_card_number(cmd.reason):
            return "reason looks like it holds a card number: never send card data"
    if cmd.saga_id is not None and len(cmd.saga_id) > 64:
        return "saga_id must be at most 64 characters"
    if any("\x00" in text for text in (cmd.reason or "", cmd.saga_id or "")):
        return "reason and saga_id must not contain NUL characters"
    return None
