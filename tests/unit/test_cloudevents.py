"""The CloudEvents Kafka binding: envelope decoding, poison cases, strict data, encoding."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest
from aiokafka.structs import ConsumerRecord

from payment.adapters.kafka.cloudevents import (
    MAX_VALUE_BYTES,
    PoisonMessage,
    decode_initiated,
    decode_record,
    decode_request,
    encode_outbound,
    format_time,
)
from payment.adapters.kafka.topics import Topics
from payment.application.commands import TraceHeaders
from payment.application.messages import OutboundMessage, PaymentInitiatedMessage

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
CARD = "4111111111111111"

HEADERS: list[tuple[str, bytes]] = [
    ("ce_specversion", b"1.0"),
    ("ce_id", b"req-1"),
    ("ce_source", b"saga-orchestrator"),
    ("ce_type", b"saga.request_payment"),
    ("ce_time", b"2026-01-02T03:04:05Z"),
    ("content-type", b"application/json"),
]
VALUE = b'{"booking_id":"b-1","amount":1000,"currency":"EUR","payment_method":"tok_visa"}'


def record(
    value: bytes | None = VALUE,
    headers: Sequence[tuple[str, bytes | None]] | None = None,
    key: bytes | None = b"b-1",
) -> ConsumerRecord[bytes, bytes]:
    hdrs = list(HEADERS if headers is None else headers)
    return ConsumerRecord(
        topic="saga.request_payment",
        partition=2,
        offset=41,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=len(key or b""),
        serialized_value_size=len(value or b""),
        headers=hdrs,
    )


def without(name: str) -> list[tuple[str, bytes | None]]:
    return [(n, v) for n, v in HEADERS if n != name]


def replaced(name: str, value: bytes | None) -> list[tuple[str, bytes | None]]:
    return [(n, value if n == name else v) for n, v in HEADERS]


def poison_reason(exc: pytest.ExceptionInfo[PoisonMessage]) -> str:
    return exc.value.reason


# -- envelope ----------------------------------------------------------------------------


def test_decodes_a_valid_envelope() -> None:
    event = decode_record(
        record(headers=[*HEADERS, ("traceparent", TRACEPARENT.encode()), ("tracestate", b"a=b")])
    )
    assert event.source == "saga-orchestrator"
    assert event.id == "req-1"
    assert event.type == "saga.request_payment"
    assert event.time == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert event.subject is None
    assert event.traceparent == TRACEPARENT
    assert event.tracestate == "a=b"
    assert event.data == VALUE
    assert (event.topic, event.partition, event.offset, event.key) == (
        "saga.request_payment",
        2,
        41,
        b"b-1",
    )


def test_optional_headers_may_be_absent() -> None:
    event = decode_record(record(headers=without("ce_time")[:4]))
    assert event.time is None
    assert event.traceparent is None


def test_unrelated_headers_are_ignored_even_if_binary() -> None:
    event = decode_record(record(headers=[*HEADERS, ("x-binary", b"\xff\xfe"), ("x-none", None)]))
    assert event.id == "req-1"


def test_header_names_match_case_insensitively() -> None:
    headers = [(n.upper(), v) for n, v in HEADERS]
    assert decode_record(record(headers=headers)).id == "req-1"


@pytest.mark.parametrize("name", ["ce_specversion", "ce_id", "ce_source", "ce_type"])
def test_missing_required_header_is_poison(name: str) -> None:
    with pytest.raises(PoisonMessage) as exc:
        decode_record(record(headers=without(name)))
    assert poison_reason(exc) == f"missing header {name}"


@pytest.mark.parametrize(
    "name", ["ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time", "content-type"]
)
def test_duplicated_header_is_poison(name: str) -> None:
    extra = dict(HEADERS)[name]
    with pytest.raises(PoisonMessage) as exc:
        decode_record(record(headers=[*HEADERS, (name, extra)]))
    assert poison_reason(exc) == f"duplicated header {name}"


@pytest.mark.parametrize("name", ["ce_id", "ce_source", "ce_type", "content-type"])
def test_header_not_utf8_is_poison(name: str) -> None:
    with pytest.raises(PoisonMessage) as exc:
        decode_record(record(headers=replaced(name, b"\xc3\x28")))
    assert poison_reason(exc) == f"header {name} is not UTF-8"


@pytest.mark.parametrize("name", ["ce_id", "ce_source"])
def test_header_without_value_or_empty_is_poison(name: str) -> None:
    with pytest.raises(PoisonMessage):
        decode_record(record(headers=replaced(name, None)))
    with pytest.raises(PoisonMessage):
        decode_record(record(headers=replaced(name, b"")))


def test_overlong_attribute_is_poison() -> None:
    with pytest.raises(PoisonMessage):
        decode_record(record(headers=replaced("ce_id", b"x" * 1025)))


def test_an_attribute_is_measured_in_bytes_not_characters() -> None:
    at_limit = "é" * 512  # 1,024 bytes in UTF-8
    assert decode_record(record(headers=replaced("ce_id", at_limit.encode()))).id == at_limit
    with pytest.raises(PoisonMessage, match="longer than 1024 bytes"):
        decode_record(record(headers=replaced("ce_id", ("é" * 513).encode())))


@pytest.mark.parametrize("version", [b"0.3", b"1", b"1.0 ", b"2.0"])
def test_other_specversion_is_poison(version: bytes) -> None:
    with pytest.raises(PoisonMessage) as exc:
        decode_record(record(headers=replaced("ce_specversion", version)))
    assert "ce_specversion" in poison_reason(exc)


@pytest.mark.parametrize(
    "content_type",
    [b"application/json", b"Application/JSON", b"application/json; charset=utf-8"],
)
def test_json_content_types_are_accepted(content_type: bytes) -> None:
    decode_record(record(headers=replaced("content-type", content_type)))


@pytest.mark.parametrize(
    "content_type",
    [b"text/plain", b"application/cloudevents+json", b"application/json; charset=latin-1"],
)
def test_other_content_type_is_poison(content_type: bytes) -> None:
    with pytest.raises(PoisonMessage) as exc:
        decode_record(record(headers=replaced("content-type", content_type)))
    assert "content-type" in poison_reason(exc)


def test_absent_content_type_is_accepted() -> None:
    assert decode_record(record(headers=without("content-type"))).data == VALUE


@pytest.mark.parametrize("text", [b"yesterday", b"2026-01-02", b"2026-01-02T03:04:05"])
def test_time_not_rfc3339_with_offset_is_poison(text: bytes) -> None:
    with pytest.raises(PoisonMessage) as exc:
        decode_record(record(headers=replaced("ce_time", text)))
    assert "ce_time" in poison_reason(exc)


def test_expected_type_is_enforced() -> None:
    decode_record(record(), expected_type="saga.request_payment")
    with pytest.raises(PoisonMessage) as exc:
        decode_record(record(), expected_type="payment.initiated")
    assert "ce_type" in poison_reason(exc)


def test_value_over_64_kib_is_poison_before_any_parsing() -> None:
    # Not JSON and no headers at all: the size is the first thing checked.
    with pytest.raises(PoisonMessage) as exc:
        decode_record(record(value=b"\xff" * (MAX_VALUE_BYTES + 1), headers=[]))
    assert "exceeds" in poison_reason(exc)


def test_value_of_exactly_64_kib_is_not_rejected_for_its_size() -> None:
    padding = b" " * (MAX_VALUE_BYTES - len(VALUE))
    event = decode_record(record(value=VALUE + padding))
    assert decode_request(event.data).booking_id == "b-1"


def test_record_without_value_is_poison() -> None:
    with pytest.raises(PoisonMessage):
        decode_record(record(value=None))


@pytest.mark.parametrize(
    "traceparent",
    [
        b"garbage",
        b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        b"\xff\xfe",
    ],
)
def test_invalid_trace_context_is_dropped_not_poison(traceparent: bytes) -> None:
    headers = [*HEADERS, ("traceparent", traceparent), ("tracestate", b"a=b")]
    event = decode_record(record(headers=headers))
    assert (event.traceparent, event.tracestate) == (None, None)


def test_duplicated_traceparent_is_dropped() -> None:
    tp = TRACEPARENT.encode()
    event = decode_record(record(headers=[*HEADERS, ("traceparent", tp), ("traceparent", tp)]))
    assert event.traceparent is None


# -- data --------------------------------------------------------------------------------


def test_decodes_request_data_and_ignores_unknown_fields() -> None:
    msg = decode_request(b'{"booking_id":"b-1","amount":5,"currency":"EUR","extra":{"x":1}}')
    assert (msg.booking_id, msg.amount, msg.currency, msg.payment_method) == ("b-1", 5, "EUR", None)


def test_msgspec_strict_mode_rejects_an_integral_float_for_int() -> None:
    # Guard the assumption the contract rests on, in case a msgspec upgrade relaxes it.
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b"1.0", type=int, strict=True)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b'{"booking_id":"b","amount":1.5}', "Expected `int | null`, got `float`"),
        (b'{"booking_id":"b","amount":1.0}', "got `float`"),
        (b'{"booking_id":"b","amount":1e3}', "got `float`"),
        (b'{"booking_id":"b","amount":"100"}', "got `str`"),
        (b'{"booking_id":"b","amount":true}', "got `bool`"),
        (b'{"booking_id":"b","currency":978}', "got `int`"),
        (b'{"booking_id":42}', "got `int`"),
        (b'{"booking_id":null}', "got `null`"),
        (b'{"amount":100}', "missing required field `booking_id`"),
        (b"[]", "Expected `object`, got `array`"),
        (b'"b-1"', "Expected `object`, got `str`"),
    ],
)
def test_wrong_shapes_are_poison_with_a_short_reason(data: bytes, fragment: str) -> None:
    with pytest.raises(PoisonMessage) as exc:
        decode_request(data)
    assert fragment in poison_reason(exc)
    assert len(poison_reason(exc)) < 120


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b'{"booking_id":"b"',
        b'{"booking_id":"\xff"}',
        b"\xef\xbb\xbf{}",
        b'{"booking_id":"b"} x',
    ],
)
def test_not_json_is_poison(data: bytes) -> None:
    with pytest.raises(PoisonMessage) as exc:
        decode_request(data)
    assert poison_reason(exc) == "saga.request_payment data is not valid UTF-8 JSON"


def test_deeply_nested_data_is_poison() -> None:
    nested = b"[" * 30_000 + b"]" * 30_000
    with pytest.raises(PoisonMessage) as exc:
        decode_request(b'{"ignored":' + nested + b',"booking_id":"b"}')
    assert poison_reason(exc) == "saga.request_payment data nests too deeply"


def test_reason_never_echoes_the_payload() -> None:
    for data in (
        b'{"booking_id":"b","payment_method":' + CARD.encode() + b"}",
        b'{"booking_id":"b","payment_method":"' + CARD.encode() + b'",',
        b'{"booking_id":["' + CARD.encode() + b'"]}',
    ):
        with pytest.raises(PoisonMessage) as exc:
            decode_request(data)
        assert CARD not in poison_reason(exc)
        assert CARD not in str(exc.value)
        assert exc.value.__cause__ is None and exc.value.__suppress_context__


def test_decode_initiated_gives_the_payment_id() -> None:
    payment_id = uuid.uuid4()
    data = msgspec.json.encode(
        PaymentInitiatedMessage(
            payment_id=str(payment_id),
            booking_id="b-1",
            saga_id=None,
            amount=100,
            currency="EUR",
            customer_id=None,
            initiated_at=datetime(2026, 1, 1, tzinfo=UTC),
            version=1,
        )
    )
    assert decode_initiated(data) == payment_id


@pytest.mark.parametrize(
    "data",
    [
        b"nope",
        b'{"payment_id":"p"}',
        b'{"payment_id":"not-a-uuid","booking_id":"b","saga_id":null,"amount":1,'
        b'"currency":"EUR","customer_id":null,"initiated_at":"2026-01-01T00:00:00Z","version":1}',
    ],
)
def test_bad_initiated_data_is_poison(data: bytes) -> None:
    with pytest.raises(PoisonMessage):
        decode_initiated(data)


# -- outbound ----------------------------------------------------------------------------


def outbound(**changes: object) -> OutboundMessage:
    msg = OutboundMessage(
        event_id=uuid.UUID("9b2f1c3e-0000-4000-8000-000000000001"),
        type="payment.completed",
        key="pay-1",
        subject="pay-1",
        sequence=2,
        time=datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        data=b'{"payment_id":"pay-1"}',
        trace=TraceHeaders(traceparent=TRACEPARENT, tracestate="vendor=x"),
    )
    return msgspec.structs.replace(msg, **changes)


def test_encode_outbound_gives_topic_key_value_and_headers() -> None:
    topic, key, value, headers = encode_outbound(
        outbound(), source="payment-service", topic_for=Topics().outbound
    )
    assert topic == "payment.completed"
    assert key == b"pay-1"
    assert value == b'{"payment_id":"pay-1"}'
    assert headers == [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"9b2f1c3e-0000-4000-8000-000000000001"),
        ("ce_source", b"payment-service"),
        ("ce_type", b"payment.completed"),
        ("ce_time", b"2026-01-02T03:04:05.678000Z"),
        ("content-type", b"application/json"),
        ("ce_dataschema", b"urn:payment-service:payment.completed:1"),
        ("ce_subject", b"pay-1"),
        ("ce_sequence", b"0000000002"),  # zero-padded: sequences sort as strings
        ("traceparent", TRACEPARENT.encode()),
        ("tracestate", b"vendor=x"),
    ]


def test_encode_outbound_omits_absent_optional_headers() -> None:
    encoded = encode_outbound(
        outbound(subject=None, sequence=None, trace=TraceHeaders(), type="payment.failed"),
        source="svc",
        topic_for=Topics(failed="custom.failed").outbound,
    )
    assert encoded.topic == "custom.failed"
    assert [name for name, _ in encoded.headers] == [
        "ce_specversion",
        "ce_id",
        "ce_source",
        "ce_type",
        "ce_time",
        "content-type",
        "ce_dataschema",
    ]


def test_dataschema_names_the_version_the_row_was_written_in() -> None:
    # A row queued by an earlier release is published under the version it holds, not
    # under today's: its data has that version's shape.
    headers = dict(
        encode_outbound(outbound(schema_version=3), source="s", topic_for=Topics().outbound).headers
    )
    assert headers["ce_dataschema"] == b"urn:payment-service:payment.completed:3"


def test_encoded_record_decodes_back() -> None:
    encoded = encode_outbound(outbound(), source="payment-service", topic_for=Topics().outbound)
    event = decode_record(record(value=encoded.value, headers=list(encoded.headers)))
    assert event.id == "9b2f1c3e-0000-4000-8000-000000000001"
    assert event.source == "payment-service"
    assert event.type == "payment.completed"
    assert event.subject == "pay-1"
    assert event.time == datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    assert event.traceparent == TRACEPARENT


def test_format_time_is_rfc3339_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert format_time(datetime(2026, 1, 2, 5, 0, tzinfo=plus_two)) == "2026-01-02T03:00:00Z"
    assert format_time(datetime(2026, 1, 2, 3, 0)) == "2026-01-02T03:00:00Z"


def test_unknown_type_has_no_topic() -> None:
    with pytest.raises(KeyError):
        encode_outbound(outbound(), source="s", topic_for={})
