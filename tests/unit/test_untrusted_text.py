"""Untrusted text the hostile-input test found a way in for: echoed ids, NULs, control chars."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from payment.adapters.kafka.cloudevents import PoisonMessage, decode_record
from payment.application.commands import InboundRef, RequestPayment, TraceHeaders
from payment.application.messages import rejection_message
from payment.application.validation import (
    CARD_MASK,
    echo_safe,
    looks_like_card_number,
    mask_card_numbers,
    validate_request,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bk-42", "bk-42"),
        ("4242 4242 4242 4242", CARD_MASK),
        ("card 4111-1111-1111-1111 123 exp", f"card {CARD_MASK} exp"),
        ("order 12345", "order 12345"),
        # A UUID whose digit groups pass the checksum is an id, not a card.
        ("11111111-2222-3333-4444-555555555555", "11111111-2222-3333-4444-555555555555"),
        ("a 4242424242424242 b 4000056655665556", f"a {CARD_MASK} b {CARD_MASK}"),
    ],
)
def test_mask_card_numbers(text: str, expected: str) -> None:
    assert mask_card_numbers(text) == expected
    assert not looks_like_card_number(
        mask_card_numbers(text).replace("11111111-2222-3333-4444-555555555555", "")
    )


def test_rejection_echoes_ids_with_card_numbers_masked() -> None:
    message = rejection_message(
        booking_id="4242 4242 4242 4242",
        saga_id="saga 4111 1111 1111 1111",
        detail="booking_id must be ...",
        at=datetime(2030, 1, 1, tzinfo=UTC),
        trace=TraceHeaders(),
    )
    data = json.loads(message.data)
    assert data["booking_id"] == CARD_MASK
    assert data["saga_id"] == f"saga {CARD_MASK}"
    assert message.key == CARD_MASK


def test_rejection_echoes_ordinary_ids_unchanged() -> None:
    message = rejection_message(
        booking_id="bk 1",
        saga_id=None,
        detail="d",
        at=datetime(2030, 1, 1, tzinfo=UTC),
        trace=TraceHeaders(),
    )
    data = json.loads(message.data)
    assert (data["booking_id"], data["saga_id"], message.key) == ("bk 1", None, "bk 1")


def test_echoed_ids_lose_their_nul_characters() -> None:
    assert echo_safe("bk\x00 4242 4242 4242 4242") == f"bk\ufffd {CARD_MASK}"
    message = rejection_message(
        booking_id="nul\x00booking",
        saga_id="s\x00",
        detail="d",
        at=datetime(2030, 1, 1, tzinfo=UTC),
        trace=TraceHeaders(),
    )
    assert "\x00" not in message.key
    assert b"\\u0000" not in message.data


@pytest.mark.parametrize("field", ["payment_method", "customer_id", "saga_id"])
def test_a_nul_in_a_stored_field_is_a_rule_break(field: str) -> None:
    fields: dict[str, str | None] = {
        "payment_method": "pm_card_visa",
        "customer_id": None,
        "saga_id": None,
    }
    fields[field] = "x\x00y"
    cmd = RequestPayment(
        inbound=InboundRef(source="s", message_id="m"),
        booking_id="bk-1",
        amount=1000,
        currency="EUR",
        **fields,  # type: ignore[arg-type]
    )
    result = validate_request(cmd, max_amount=100_000)
    assert isinstance(result, str) and "NUL" in result


class Record:
    topic = "requests"
    partition = 0
    offset = 1
    key = b"k"
    value = b"{}"

    def __init__(self, headers: list[tuple[str, bytes | None]]) -> None:
        self.headers = headers


@pytest.mark.parametrize("name", ["ce_id", "ce_source", "ce_type", "ce_subject"])
@pytest.mark.parametrize("char", [b"\x00", b"\n", b"\x1b", b"\x7f", b"\xc2\x85"])
def test_a_control_character_in_a_cloudevents_attribute_is_poison(name: str, char: bytes) -> None:
    headers: list[tuple[str, bytes | None]] = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"id-1"),
        ("ce_source", b"src"),
        ("ce_type", b"saga.request_payment"),
    ]
    headers = [(k, v) for k, v in headers if k != name] + [(name, b"a" + char + b"b")]
    with pytest.raises(PoisonMessage, match="control character"):
        decode_record(Record(headers))
