"""Rules of contract section 3 for `saga.request_payment` and `saga.refund_payment`."""

from __future__ import annotations

import re

from payment.application.commands import RefundPayment, RequestPayment
from payment.domain.errors import InvalidMoney
from payment.domain.money import Money

_BOOKING_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_CARD_LIKE = re.compile(r"[0-9][0-9 -]{11,}[0-9]")
_SEPARATORS = re.compile(r"[ -]+")


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
    """True if `text` contains a 13-19 digit Luhn-valid number (spaces and dashes allowed).

    A run of digit groups is judged by its consecutive whole groups: a card number
    followed by a CVC or an expiry date is still a card, while an unbroken longer number
    is not one just because some stretch of it passes the checksum.
    """
    for match in _CARD_LIKE.finditer(text):
        groups = _SEPARATORS.split(match.group())
        for first in range(len(groups)):
            digits = ""
            for group in groups[first:]:
                digits += group
                if len(digits) > 19:
                    break
                if len(digits) >= 13 and luhn_valid(digits):
                    return True
    return False


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
CARD_MASK = "[REDACTED CARD]"


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


class Valid:
    """A request that passed every rule, with its money."""

    __slots__ = ("money", "payment_method")

    def __init__(self, money: Money, payment_method: str) -> None:
        self.money = money
        self.payment_method = payment_method


def validate_request(cmd: RequestPayment, *, max_amount: int) -> Valid | str:
    """The validated request, or a human-readable reason (never echoing secrets) it breaks."""
    if not _BOOKING_ID.fullmatch(cmd.booking_id):
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
    return Valid(money, method)


def valid_booking_id(booking_id: str) -> bool:
    """True for a booking id of contract 3 (1-64 characters of A-Z a-z 0-9 . _ : -)."""
    return _BOOKING_ID.fullmatch(booking_id) is not None


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
