"""KafkaDeadLetterPublisher with a fake producer: the partition keeps moving (a size limit),
and no card number is ever published."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError

from payment.adapters.kafka.dead_letters import KafkaDeadLetterPublisher
from payment.application.validation import looks_like_card_number
from support.record_senders import FakeRecordQueue, Outgoing

Headers = Sequence[tuple[str, bytes | None]]


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers


class LimitedProducer(FakeRecordQueue):
    """Refuses any record larger than `limit` bytes, as aiokafka or the broker would, and
    a record with neither key nor value, as aiokafka's `send` does."""

    def __init__(self, limit: int, *, down: bool = False) -> None:
        self.limit = limit
        self.down = down
        self.sent: list[Outgoing] = []

    async def deliver(self, record: Outgoing) -> object:
        if record.value is None and record.key is None:
            raise AssertionError("Need at least one: key or value")  # aiokafka's words
        if self.down:
            raise KafkaConnectionError("broker down")
        size = len(record.key or b"") + len(record.value or b"")
        size += sum(len(n) + len(v or b"") for n, v in record.headers)
        if size > self.limit:
            raise MessageSizeTooLargeError(f"{size} bytes")
        self.sent.append(record)
        return object()


def record(
    value: bytes | None, headers: Headers = (("ce_id", b"1"),), key: bytes | None = b"booking-1"
) -> Record:
    return Record("requests", 2, 40, key, value, headers)


def header(headers: Headers, name: str) -> bytes | None:
    return next(v for n, v in headers if n == name)


async def test_a_record_that_fits_is_parked_verbatim() -> None:
    producer = LimitedProducer(10_000)
    await KafkaDeadLetterPublisher(producer, "dlq", "group").publish(record(b"{}"), "poison")
    [(topic, key, value, headers)] = producer.sent
    assert (topic, key, value) == ("dlq", b"booking-1", b"{}")
    assert headers[0] == ("ce_id", b"1")
    assert header(headers, "dlq_reason") == b"poison"
    assert not any(n in ("dlq_value_dropped", "dlq_headers_dropped") for n, _ in headers)


async def test_a_value_too_large_to_park_is_dropped_and_said_so() -> None:
    producer = LimitedProducer(1_000)
    big = b"x" * 5_000
    await KafkaDeadLetterPublisher(producer, "dlq", "group").publish(record(big), "too big")
    [(_, key, value, headers)] = producer.sent
    assert key == b"booking-1" and value is None
    assert headers[0] == ("ce_id", b"1"), "the original headers stay"
    assert header(headers, "dlq_value_dropped") == b"5000"
    assert header(headers, "dlq_original_offset") == b"40"


async def test_headers_too_large_are_dropped_as_well() -> None:
    producer = LimitedProducer(1_000)
    huge_headers = [("x-junk", b"j" * 3_000), ("ce_id", b"1")]
    await KafkaDeadLetterPublisher(producer, "dlq", "group").publish(
        record(b"x" * 5_000, huge_headers), "too big"
    )
    [(_, _, value, headers)] = producer.sent
    assert value is None
    assert [n for n, _ in headers if not n.startswith("dlq_")] == []
    assert header(headers, "dlq_headers_dropped") == str(len("x-junk") + 3_000 + 6).encode()


async def test_a_huge_key_goes_first_and_the_value_stays() -> None:
    producer = LimitedProducer(1_000)
    await KafkaDeadLetterPublisher(producer, "dlq", "group").publish(
        record(b"{}", key=b"k" * 5_000), "poison"
    )
    [(_, key, value, headers)] = producer.sent
    assert (key, value) == (None, b"{}")
    assert header(headers, "dlq_key_dropped") == b"5000"
    assert not any(n in ("dlq_value_dropped", "dlq_headers_dropped") for n, _ in headers)


async def test_an_outage_still_propagates_for_the_caller_to_retry() -> None:
    producer = LimitedProducer(1_000, down=True)
    with pytest.raises(KafkaConnectionError):
        await KafkaDeadLetterPublisher(producer, "dlq", "group").publish(record(b"{}"), "p")


async def test_dlq_headers_of_a_redriven_record_are_replaced_whatever_their_case() -> None:
    producer = LimitedProducer(10_000)
    stale = [("ce_id", b"1"), ("dlq_reason", b"old"), ("DLQ_ORIGINAL_OFFSET", b"7")]
    await KafkaDeadLetterPublisher(producer, "dlq", "group").publish(record(b"{}", stale), "new")
    [(_, _, _, headers)] = producer.sent
    assert [v for n, v in headers if n.lower() == "dlq_reason"] == [b"new"]
    assert [v for n, v in headers if n.lower() == "dlq_original_offset"] == [b"40"]


async def test_a_record_with_neither_key_nor_value_is_parked_with_an_empty_value() -> None:
    key, value, headers = await parked(record(None, key=None))
    assert (key, value) == (None, b"")
    assert header(headers, "dlq_reason") == b"poison"
    assert header(headers, "dlq_original_offset") == b"40"


async def test_a_keyless_value_too_large_to_park_leaves_an_empty_value() -> None:
    producer = LimitedProducer(1_000)
    await KafkaDeadLetterPublisher(producer, "dlq", "group").publish(
        record(b"x" * 5_000, key=None), "too big"
    )
    [(_, key, value, headers)] = producer.sent
    assert (key, value) == (None, b"")
    assert header(headers, "dlq_value_dropped") == b"5000"


# -- card numbers (contract section 3: never published) -------------------------------------

CARD = "4111111111111111"
MASK = b"[REDACTED CARD]"
CE_ID = "9b2f0a4e-1c3d-4e5f-8a7b-6c5d4e3f2a1b"  # a UUID: kept, whatever its digits
UNDECODABLE = (
    '{"booking_id": "booking-1", "amount": "100", "currency": "EUR", '
    '"payment_method": "%s", "saga_id": "%s"}'
)


async def parked(rec: Record) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]:
    producer = LimitedProducer(10_000)
    await KafkaDeadLetterPublisher(producer, "dlq", "group").publish(rec, "poison")
    [(_, key, value, headers)] = producer.sent
    return key, value, headers


def no_card(data: bytes | None) -> bool:
    text = (data or b"").decode("utf-8", "replace")
    return not looks_like_card_number(text.replace(CE_ID, ""))


@pytest.mark.parametrize(
    "card", [CARD, "4111 1111 1111 1111", "4111-1111-1111-1111", "378282246310005"]
)
async def test_a_card_number_in_the_value_is_masked_and_everything_else_kept(card: str) -> None:
    value = (UNDECODABLE % (card, CE_ID)).encode()
    key, parked_value, headers = await parked(record(value))
    assert parked_value == (UNDECODABLE % ("[REDACTED CARD]", CE_ID)).encode()
    assert no_card(parked_value)
    assert key == b"booking-1"
    assert headers[0] == ("ce_id", b"1")
    assert header(headers, "dlq_reason") == b"poison"
    assert header(headers, "dlq_card_numbers_masked") == b"value"


@pytest.mark.parametrize(
    "card",
    [
        "".join(f"\\u{ord(c):04x}" for c in CARD),  # every digit a JSON escape
        "4111\\u00201111\\u00201111\\u00201111",  # escaped spaces
        "4111\\u002D1111\\u002d1111-1111",  # escaped dashes, either case
        "\\u00341111111111111111"[:-1],  # one escaped digit among plain ones
    ],
)
async def test_a_card_number_written_with_json_escapes_is_masked(card: str) -> None:
    value = (UNDECODABLE % (card, CE_ID)).encode()
    _, parked_value, headers = await parked(record(value))
    assert parked_value == (UNDECODABLE % ("[REDACTED CARD]", CE_ID)).encode()
    assert header(headers, "dlq_card_numbers_masked") == b"value"


async def test_a_card_number_in_the_key_and_in_a_header_is_masked() -> None:
    original_headers = [
        ("ce_id", CE_ID.encode()),
        ("x-card", f"pan={CARD[:4]} {CARD[4:8]} {CARD[8:12]} {CARD[12:]}; exp 12/29".encode()),
        ("x-none", None),
        ("x-binary", b"\x00\xff"),
    ]
    key, value, headers = await parked(
        record(b"not json", original_headers, key=f"card-{CARD}".encode())
    )
    assert key == b"card-" + MASK
    assert value == b"not json"
    assert [(n, v) for n, v in headers if not n.startswith("dlq_")] == [
        ("ce_id", CE_ID.encode()),
        ("x-card", b"pan=" + MASK + b"; exp 12/29"),
        ("x-none", None),
        ("x-binary", b"\x00\xff"),
    ]
    assert header(headers, "dlq_card_numbers_masked") == b"key,headers"
    assert all(no_card(v) for _, v in headers)


async def test_every_part_masked_is_named_in_order() -> None:
    _, _, headers = await parked(
        record(CARD.encode(), [("x-card", CARD.encode())], key=CARD.encode())
    )
    assert header(headers, "dlq_card_numbers_masked") == b"value,key,headers"


async def test_invalid_utf8_around_a_card_number_survives_byte_for_byte() -> None:
    value = b'\xff\xfe{"payment_method": "\xc3' + CARD.encode() + b'\xed\xa0\x80", "x": "\xe2\x82"}'
    key = b"\x80" + CARD.encode() + b"\xc0\xaf"
    _, parked_value, headers = await parked(record(value, [("x", b"\xff" + CARD.encode())], key))
    assert parked_value == value.replace(CARD.encode(), MASK)
    assert header(headers, "x") == b"\xff" + MASK
    assert header(headers, "dlq_card_numbers_masked") == b"value,key,headers"


async def test_a_record_without_card_numbers_is_parked_exactly_as_before() -> None:
    # Long digit runs that are not card numbers: not Luhn-valid, too long, a UUID.
    value = b'{"amount": "100", "n": "4111111111111112", "big": "12345678901234567890123"}'
    original_headers = [("ce_id", CE_ID.encode()), ("x-binary", b"\x00\xff\xfe"), ("x", None)]
    rec = record(value + b"\xff", original_headers, key=b"1700000000001")
    key, parked_value, headers = await parked(rec)
    assert (key, parked_value) == (rec.key, rec.value)
    assert headers == [
        *original_headers,
        ("dlq_reason", b"poison"),
        ("dlq_original_topic", b"requests"),
        ("dlq_original_partition", b"2"),
        ("dlq_original_offset", b"40"),
        ("dlq_consumer_group", b"group"),
    ]


async def test_a_stale_masking_header_of_a_redriven_record_is_shed() -> None:
    stale = [("ce_id", b"1"), ("DLQ_CARD_NUMBERS_MASKED", b"value")]
    _, _, headers = await parked(record(b"{}", stale))
    assert not any(n.lower() == "dlq_card_numbers_masked" for n, _ in headers)


async def test_a_masked_value_too_large_to_park_is_dropped_and_no_longer_said_masked() -> None:
    producer = LimitedProducer(1_000)
    value = CARD.encode() + b"x" * 5_000
    await KafkaDeadLetterPublisher(producer, "dlq", "group").publish(
        record(value, key=CARD.encode()), "too big"
    )
    [(_, key, parked_value, headers)] = producer.sent
    assert (key, parked_value) == (MASK, None)
    assert header(headers, "dlq_value_dropped") == str(len(value)).encode(), "the record's size"
    assert header(headers, "dlq_card_numbers_masked") == b"key", "only what it still carries"
