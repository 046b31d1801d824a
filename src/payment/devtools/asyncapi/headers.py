"""The Kafka headers of each message: CloudEvents attributes, and those of a dead letter."""

from __future__ import annotations

from typing import Final

from payment.adapters.kafka.cloudevents import (
    CONTENT_TYPE,
    H_CONTENT_TYPE,
    H_DATASCHEMA,
    H_ID,
    H_SEQUENCE,
    H_SOURCE,
    H_SPECVERSION,
    H_SUBJECT,
    H_TIME,
    H_TRACEPARENT,
    H_TRACESTATE,
    H_TYPE,
    MAX_ATTRIBUTE_BYTES,
    MAX_TRACESTATE_CHARS,
    SEQUENCE_DIGITS,
    SPECVERSION,
)
from payment.application.messages import (
    PaymentFailedMessage,
    PaymentRefundFailedMessage,
    RefundPaymentMessage,
    RequestPaymentMessage,
    dataschema_uri,
)
from payment.devtools.asyncapi.messages import MessageSpec
from payment.devtools.asyncapi.rules import Schema

# Written by payment.adapters.kafka.dead_letters (not imported: this module needs only the
# header names, and the test checks they agree).
DLQ_HEADERS: Final = (
    "dlq_reason",
    "dlq_original_topic",
    "dlq_original_partition",
    "dlq_original_offset",
    "dlq_consumer_group",
)
# Only on a record too large to park whole (its value, then its headers, left out).
DLQ_DROPPED_HEADERS: Final = ("dlq_value_dropped", "dlq_headers_dropped", "dlq_key_dropped")
# Only on a record whose card numbers were masked: the parts that were.
DLQ_CARD_NUMBERS_MASKED: Final = "dlq_card_numbers_masked"
DLQ_MASKED_PARTS: Final = ("value", "key", "headers")


def cloudevents_headers(spec: MessageSpec) -> Schema:
    """Contract section 2: the binary-mode CloudEvents headers of one message type."""
    inbound = spec.struct in (RequestPaymentMessage, RefundPaymentMessage)
    # Only a rejection (or refused refund), which created no event, goes out without
    # subject and sequence.
    of_a_payment = not inbound and spec.struct not in (
        PaymentFailedMessage,
        PaymentRefundFailedMessage,
    )
    attribute: Schema = {"type": "string", "minLength": 1, "maxLength": MAX_ATTRIBUTE_BYTES}
    if inbound:
        ce_id = {**attribute, "description": "With `ce_source`, the deduplication key."}
        ce_source = {**attribute, "description": "The sender."}
    else:
        ce_id = {
            "type": "string",
            "format": "uuid",
            "description": "The event's own id, identical on every re-publication of it.",
        }
        ce_source = {
            **attribute,
            "description": "`PAYMENT_EVENT_SOURCE` (default `payment-service`).",
        }
    properties: Schema = {
        H_SPECVERSION: {"type": "string", "const": SPECVERSION},
        H_ID: ce_id,
        H_SOURCE: ce_source,
        H_TYPE: {"type": "string", "const": spec.ce_type},
        H_TIME: {"type": "string", "format": "date-time", "description": "RFC 3339."},
        H_CONTENT_TYPE: {"type": "string", "const": CONTENT_TYPE},
    }
    if inbound:
        properties[H_SUBJECT] = {**attribute, "description": "Optional; not used."}
    else:
        absent = "" if of_a_payment else "; absent on a rejection that created no payment"
        properties[H_SUBJECT] = {
            "type": "string",
            "format": "uuid",
            "description": f"The payment id{absent}.",
        }
        properties[H_SEQUENCE] = {
            "type": "string",
            "pattern": "^[0-9]+$",
            "description": (
                f"The event's version in its payment stream, decimal, zero-padded to"
                f" {SEQUENCE_DIGITS} digits so that sequences sort as strings (earlier"
                f" releases sent it unpadded){absent}."
            ),
        }
    if spec.version is not None:
        properties[H_DATASCHEMA] = {
            "type": "string",
            "const": dataschema_uri(spec.ce_type, spec.version),
            "description": (
                f"Schema version {spec.version} of `{spec.ce_type}` data. Absent on events"
                " published by releases before schema versions: those are version 1."
            ),
        }
    properties[H_TRACEPARENT] = {
        "type": "string",
        "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
        "description": (
            "W3C Trace Context; outbound events carry the trace of the request that caused them."
            + (" An invalid one is ignored, never a reason to reject." if inbound else "")
        ),
    }
    properties[H_TRACESTATE] = {
        "type": "string",
        "maxLength": MAX_TRACESTATE_CHARS,
        "description": "W3C Trace Context; meaningful only with `traceparent`.",
    }
    return {
        "type": "object",
        "description": "CloudEvents 1.0 attributes, Kafka binary content mode (UTF-8 values).",
        "properties": properties,
        "required": [
            H_SPECVERSION,
            H_ID,
            H_SOURCE,
            H_TYPE,
            H_TIME,
            H_CONTENT_TYPE,
            *((H_SUBJECT, H_SEQUENCE) if of_a_payment else ()),
        ],
    }


def dead_letter_headers() -> Schema:
    """Contract section 4.5: the original headers plus where and why it was parked."""
    reason, topic, partition, offset, group = DLQ_HEADERS
    number: Schema = {"type": "string", "pattern": "^[0-9]+$"}
    return {
        "type": "object",
        "description": (
            "The original record's headers, unchanged (its `ce_type`, if any, is the original "
            "type), plus these; `dlq_*` headers of an earlier dead-lettering are replaced. "
            "A record too large for the dead-letter topic is parked without its largest part "
            "(value, original headers or key), then the next largest, until it fits, each "
            "named by a `dlq_*_dropped` header, so that the partition keeps moving. "
            "Card numbers (13-19 digit Luhn-valid runs, spaces and dashes allowed) in the "
            "value, the key or an original header value are replaced by `[REDACTED CARD]`, "
            "every other byte kept, and `dlq_card_numbers_masked` is added."
        ),
        "properties": {
            reason: {"type": "string", "description": "Why; short, never the payload."},
            topic: {"type": "string", "description": "Topic the record was consumed from."},
            partition: {**number, "description": "Its partition, decimal."},
            offset: {**number, "description": "Its offset, decimal."},
            group: {"type": "string", "description": "The consumer group that gave up on it."},
            DLQ_DROPPED_HEADERS[0]: {
                **number,
                "description": "Size in bytes of the value left out (the record has none).",
            },
            DLQ_DROPPED_HEADERS[1]: {
                **number,
                "description": "Size in bytes of the original headers left out.",
            },
            DLQ_DROPPED_HEADERS[2]: {
                **number,
                "description": "Size in bytes of the key left out (the record has none).",
            },
            DLQ_CARD_NUMBERS_MASKED: {
                "type": "string",
                "pattern": "^(value(,key)?(,headers)?|key(,headers)?|headers)$",
                "description": (
                    "Present only when card numbers were masked: the parts whose card numbers "
                    "were, comma-separated in this order (`value,key,headers` at most; a part "
                    "left out for its size is not named). The record is then not the original "
                    "one: it is never re-driven."
                ),
            },
        },
        "required": list(DLQ_HEADERS),
    }
