"""Span attributes that come from the sender are bounded and masked before they are set."""

from __future__ import annotations

import json

import pytest
from aiokafka.structs import ConsumerRecord
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from payment.adapters.kafka.consumer import KafkaInboxConsumer
from payment.adapters.memory import MemoryUnitOfWorkFactory, SystemClock
from payment.adapters.observability.metrics import Metrics
from payment.adapters.observability.span_values import MAX_ATTRIBUTE_CHARS, untrusted_attribute
from payment.adapters.processors.fake import FakeProcessor
from payment.application.handlers import ExecutionPolicy, RequestPolicy
from payment.application.validation import CARD_MASK, looks_like_card_number
from payment.runtime.transient import is_transient

CARD = "4242424242424242"
ESCAPED_CARD = "".join(f"\\u{ord(c):04x}" for c in CARD)  # as JSON may carry it, raw


@pytest.mark.parametrize(
    "text",
    [
        CARD,
        "4242 4242 4242 4242",
        "4242-4242-4242-4242",
        f"id-{CARD}-x",
        ESCAPED_CARD,
        "4242\\u00204242\\u00204242\\u00204242",
    ],
)
def test_a_card_number_is_masked(text: str) -> None:
    value = untrusted_attribute(text)
    assert CARD_MASK in value
    assert not looks_like_card_number(value)
    assert "4242" not in value.replace(CARD_MASK, "")


def test_a_huge_value_is_cut_to_the_bound_and_says_so() -> None:
    value = untrusted_attribute("b" * 65_536)
    assert len(value) == MAX_ATTRIBUTE_CHARS
    assert value.endswith("…")


def test_a_card_number_across_the_cut_leaves_no_digits_behind() -> None:
    text = "x" * (MAX_ATTRIBUTE_CHARS * 4 - 6) + CARD + "y" * 1000
    assert "424242" not in untrusted_attribute(text, limit=MAX_ATTRIBUTE_CHARS * 5)


def test_control_characters_are_escaped_and_ordinary_ids_kept() -> None:
    assert untrusted_attribute("saga-orchestrator") == "saga-orchestrator"
    assert untrusted_attribute("a\nb\x1b[31m") == "a\\x0ab\\x1b[31m"
    assert untrusted_attribute("11111111-2222-3333-4444-555555555555") == (
        "11111111-2222-3333-4444-555555555555"
    )


def _record(booking_id: str, ce_id: str, ce_source: str) -> ConsumerRecord[bytes, bytes]:
    value = json.dumps(
        {"booking_id": booking_id, "amount": 0, "currency": "EUR", "payment_method": "tok"}
    ).encode()
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", ce_id.encode()),
        ("ce_source", ce_source.encode()),
        ("ce_type", b"saga.request_payment"),
        ("ce_time", b"2026-01-02T03:04:05Z"),
        ("content-type", b"application/json"),
    ]
    return ConsumerRecord(
        topic="requests",
        partition=0,
        offset=7,
        timestamp=0,
        timestamp_type=0,
        key=None,
        value=value,
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=len(value),
        headers=headers,
    )


class Parked:
    async def publish(self, record: ConsumerRecord[bytes, bytes], reason: str) -> None:
        pass


async def test_the_consumer_span_carries_no_card_number_and_no_huge_value() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    inbox = KafkaInboxConsumer(
        consumer_factory=None,  # type: ignore[arg-type]
        request_topic="requests",
        initiated_topic="initiated",
        uow_factory=MemoryUnitOfWorkFactory(),
        processor=FakeProcessor(),
        clock=SystemClock(),
        dead_letters=Parked(),
        metrics=Metrics(),
        request_policy=RequestPolicy(),
        policy=ExecutionPolicy(),
        is_transient=is_transient,
        tracer=provider.get_tracer("test"),
    )

    await inbox._handle(_record("B" * 65_000, f"id-{CARD}", f"src {CARD[:8]} {CARD[8:]}"))

    [span] = exporter.get_finished_spans()
    attributes = dict(span.attributes or {})
    for name in ("payment.booking_id", "cloudevents.event_id", "cloudevents.event_source"):
        value = str(attributes[name])
        assert len(value) <= MAX_ATTRIBUTE_CHARS, name
        assert not looks_like_card_number(value), name
    assert attributes["cloudevents.event_id"] == f"id-{CARD_MASK}"
    assert attributes["messaging.message.id"] == f"id-{CARD_MASK}"
