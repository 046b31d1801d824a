"""The CloudEvents SDK as the codec's oracle: Kafka binary content mode, both directions.

What `encode_outbound` writes, the SDK reads as the same event (attributes and data);
what the SDK writes, `decode_record` reads as the same envelope. The contract's envelope
is binary mode only (contract §2), so structured mode is not compared.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace

import msgspec
import pytest
from cloudevents.core.bindings.kafka import KafkaMessage, from_binary, to_binary
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from hypothesis import given, settings
from hypothesis import strategies as st

from payment.adapters.kafka.cloudevents import (
    decode_record,
    decode_request,
    encode_outbound,
    format_sequence,
    parse_sequence,
)
from payment.adapters.kafka.topics import Topics
from payment.application.commands import TraceHeaders
from payment.application.messages import OutboundMessage

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

_times = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=40)


def _record(message: KafkaMessage) -> SimpleNamespace:
    """The consumed record of a message the SDK wrote (what `decode_record` reads of one)."""
    key = message.key.encode() if isinstance(message.key, str) else message.key
    headers = list(message.headers.items())
    return SimpleNamespace(
        topic="t", partition=0, offset=7, key=key, value=message.value, headers=headers
    )


@settings(max_examples=60, deadline=None)
@given(
    event_id=st.uuids(),
    payment_id=st.uuids(),
    sequence=st.integers(min_value=1, max_value=10**9),
    at=_times,
    booking=_text,
    kind=st.sampled_from(["payment.initiated", "payment.completed", "payment.failed"]),
)
def test_what_we_publish_the_sdk_reads_as_the_same_event(
    event_id: uuid.UUID,
    payment_id: uuid.UUID,
    sequence: int,
    at: datetime,
    booking: str,
    kind: str,
) -> None:
    data = {"payment_id": str(payment_id), "booking_id": booking, "version": sequence}
    message = OutboundMessage(
        event_id=event_id,
        type=kind,
        key=str(payment_id),
        subject=str(payment_id),
        sequence=sequence,
        time=at,
        data=msgspec.json.encode(data),
        trace=TraceHeaders(traceparent=TRACEPARENT),
    )
    encoded = encode_outbound(message, source="payment-service", topic_for=Topics().outbound)

    event = from_binary(
        KafkaMessage(headers=dict(encoded.headers), key=encoded.key, value=encoded.value),
        JSONFormat(),
        CloudEvent,
    )

    assert event.get_specversion() == "1.0"
    assert event.get_id() == str(event_id)
    assert event.get_source() == "payment-service"
    assert event.get_type() == kind
    assert event.get_time() == at
    assert event.get_subject() == str(payment_id)
    assert event.get_datacontenttype() == "application/json"
    assert event.get_dataschema() == f"urn:payment-service:{kind}:1"
    assert parse_sequence(event.get_extension("sequence")) == sequence
    assert event.get_data() == data


@settings(max_examples=60, deadline=None)
@given(
    ce_id=_text.filter(bool),
    source=_text.filter(bool),
    at=_times,
    booking=st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True),
    amount=st.integers(min_value=1, max_value=100_000_000),
)
def test_what_the_sdk_publishes_we_read_as_the_same_envelope(
    ce_id: str, source: str, at: datetime, booking: str, amount: int
) -> None:
    data = {
        "booking_id": booking,
        "amount": amount,
        "currency": "EUR",
        "payment_method": "pm_card_visa",
    }
    event = CloudEvent(
        attributes={
            "id": ce_id,
            "source": source,
            "type": "saga.request_payment",
            "time": at,
            "subject": booking,
            "datacontenttype": "application/json",
            "partitionkey": booking,
        },
        data=data,
    )

    decoded = decode_record(
        _record(to_binary(event, JSONFormat())), expected_type="saga.request_payment"
    )

    assert (decoded.source, decoded.id, decoded.type) == (source, ce_id, "saga.request_payment")
    assert decoded.time == at
    assert decoded.subject == booking
    assert decoded.key == booking.encode()
    assert json.loads(decoded.data) == data
    request = decode_request(decoded.data)
    assert (request.booking_id, request.amount) == (booking, amount)


@given(st.lists(st.integers(min_value=1, max_value=10**9), min_size=2, max_size=20))
def test_sequences_sort_as_strings_in_stream_order(versions: list[int]) -> None:
    # CloudEvents' sequence extension orders events by comparing sequence strings.
    assert sorted(versions, key=format_sequence) == sorted(versions)


@given(st.integers(min_value=1, max_value=10**9))
def test_padded_and_unpadded_sequences_name_the_same_version(version: int) -> None:
    assert parse_sequence(format_sequence(version)) == version
    assert parse_sequence(str(version)) == version  # as releases before padding sent it


@pytest.mark.parametrize("text", ["", "-1", "+1", "1.0", " 1", "1e3", "\u0661"])
def test_a_sequence_that_is_not_decimal_digits_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_sequence(text)
