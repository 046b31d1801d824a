"""The AsyncAPI 3.0 document of the contract: info, channels, operations, components."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Final

import msgspec

from payment.adapters.kafka.cloudevents import (
    CONTENT_TYPE,
)
from payment.adapters.kafka.topics import Topics
from payment.devtools.asyncapi.headers import cloudevents_headers, dead_letter_headers
from payment.devtools.asyncapi.messages import (
    DEAD_LETTER,
    DEAD_LETTER_CHANNEL,
    MESSAGES,
    MessageSpec,
)
from payment.devtools.asyncapi.rules import OVERLAYS, Overlay, Schema, apply_overlay

ASYNCAPI_VERSION: Final = "3.0.0"
# 1.1.0: refunds (saga.refund_payment, payment.refunded, payment.refund_failed) and the
# `cancelled` reason of payment.failed (contract v2, 4.8).
CONTRACT_VERSION: Final = "1.1.0"
KAFKA_BINDING_VERSION: Final = "0.5.0"

_DESCRIPTION: Final = """\
Payment service of the booking SAGA: it takes payment requests from the orchestrator over
Kafka, charges each booking at most once through a payment gateway, and publishes the outcome.

Envelope: CloudEvents 1.0, Kafka protocol binding, binary content mode. The Kafka value is
the JSON `data`; the attributes travel as `ce_*` headers (UTF-8). Inbound messages are
deduplicated by (`ce_source`, `ce_id`). Outbound events keep their `ce_id` on every
re-publication, carry the payment id as key and `ce_subject`, and are published in stream
order on one partition per payment (`ce_sequence` = version in the payment's stream).

What the orchestrator can rely on:

1. One payment per booking: a valid request for a new booking gives exactly one
   `payment.initiated`, then exactly one terminal event, `payment.completed` or
   `payment.failed`.
2. A redelivered request (same `ce_source` and `ce_id`) changes nothing and publishes nothing.
3. A new request for a booking that already has a payment never charges again: a terminal
   outcome is published again with its original `ce_id`; an in-flight one follows as usual.
   A request whose amount or currency differs from the existing payment is dead-lettered.
4. A request that decodes but breaks a rule of its schema gets exactly one `payment.failed`
   with `reason` = `invalid_request`, and no processor call.
5. A message that cannot be decoded (not JSON, missing CloudEvents headers, wrong types,
   missing `booking_id`, over 64 KiB) goes to `payment.dead_letter` with its original bytes
   and headers plus `dlq_*` headers; the partition keeps moving. A card number in them is
   masked, never published (`dlq_card_numbers_masked` then says where).
6. A gateway decline gives `payment.failed` with `reason` = `declined`. A gateway timeout or
   lost response is never reported as a failure: the payment is reconciled with the gateway
   until its real outcome is known.
7. No request is lost and no booking is charged twice across crashes, restarts,
   redeliveries, rebalances and several instances in one consumer group.
8. Refunds: a valid `saga.refund_payment` (new `ce_id`) creates one refund with its own
   gateway idempotency key and gives exactly one `payment.refunded` or
   `payment.refund_failed`; a redelivery changes nothing. The sum refunded never exceeds
   the amount charged, under any concurrency. A refund for a payment still in flight waits
   for its outcome (completed: refunded; failed: `not_charged`); a refund timeout is never
   a failure. A refund for a booking without a payment answers `not_charged` and closes
   the booking: a later payment request for it gets `payment.failed` / `cancelled`.

Schema versions: every outbound event says which version of its `data` shape it carries
in `ce_dataschema` (`urn:payment-service:<ce_type>:<version>`). Each channel lists every
version the service has ever published, as one message per version (`…V1`, `…V2`); an
event queued before an upgrade is published under the version it was written in. A field
added with a default keeps the version (readers ignore unknown fields); any other change
adds a version. Events published by releases before versions existed carry no
`ce_dataschema`: they are version 1.

Topic names are the defaults; each is configurable (`PAYMENT_TOPIC_*`).
"""


def build_document() -> Schema:
    """The AsyncAPI 3.0 document of the contract, as plain JSON-compatible data."""
    topics = Topics()
    refs, generated = msgspec.json.schema_components(
        [spec.struct for spec in MESSAGES], ref_template="#/components/schemas/{name}"
    )
    overlays = {struct.__name__: overlay for struct, overlay in OVERLAYS.items()}
    schemas: Schema = {}
    for name, schema in generated.items():
        cleaned = dict(schema)
        if "description" in cleaned:
            cleaned["description"] = inspect.cleandoc(cleaned["description"])
        schemas[name] = apply_overlay(cleaned, overlays.get(name, Overlay()))
    for spec in MESSAGES:
        schemas[f"{spec.id}Headers"] = cloudevents_headers(spec)
    schemas[f"{DEAD_LETTER}Headers"] = dead_letter_headers()

    messages: Schema = {}
    channels: Schema = {}
    for spec, ref in zip(MESSAGES, refs, strict=True):
        messages[spec.id] = _message(spec, ref)
        channels[spec.channel] = _channel(
            getattr(topics, spec.topic_field), spec.topic_field, _ids_on(spec.channel)
        )
    messages[DEAD_LETTER] = _dead_letter_message()
    channels[DEAD_LETTER_CHANNEL] = _channel(topics.dead_letter, "dead_letter", [DEAD_LETTER])

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "payment-service",
            "version": CONTRACT_VERSION,
            "description": _DESCRIPTION,
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": CONTENT_TYPE,
        "channels": channels,
        "operations": _operations(),
        "components": {"schemas": schemas, "messages": messages},
    }


def _ids_on(channel: str) -> list[str]:
    """The messages of a channel: every version of its message type."""
    return [spec.id for spec in MESSAGES if spec.channel == channel]


def _channel(address: str, topic_field: str, messages: Sequence[str]) -> Schema:
    return {
        "address": address,
        "description": (
            f"Default topic name; configurable with `PAYMENT_TOPIC_{topic_field.upper()}`."
        ),
        "messages": {m: {"$ref": f"#/components/messages/{m}"} for m in messages},
    }


def _message(spec: MessageSpec, payload_ref: Schema) -> Schema:
    return {
        "name": spec.id,
        "title": spec.ce_type if spec.version is None else f"{spec.ce_type} v{spec.version}",
        "summary": spec.summary,
        "contentType": CONTENT_TYPE,
        "headers": {"$ref": f"#/components/schemas/{spec.id}Headers"},
        "payload": payload_ref,
        "correlationId": {
            "description": "The orchestrator correlates by booking id.",
            "location": "$message.payload#/booking_id",
        },
        "bindings": {"kafka": {"key": spec.key, "bindingVersion": KAFKA_BINDING_VERSION}},
    }


def _dead_letter_message() -> Schema:
    return {
        "name": DEAD_LETTER,
        "title": "dead letter",
        "summary": "A record that can never be processed, parked with its original bytes.",
        "contentType": "application/octet-stream",
        "headers": {"$ref": f"#/components/schemas/{DEAD_LETTER}Headers"},
        "payload": {
            "type": "string",
            "format": "binary",
            "description": (
                "The original record value, byte for byte (it may not be JSON), but for card "
                "numbers: each is replaced by `[REDACTED CARD]` (see `dlq_card_numbers_masked`)."
            ),
        },
        "bindings": {
            "kafka": {
                "key": {
                    "description": (
                        "The original record's key, unchanged (or none), but for card numbers, "
                        "masked like the value."
                    )
                },
                "bindingVersion": KAFKA_BINDING_VERSION,
            }
        },
    }


def _operations() -> Schema:
    def operation(action: str, channel: str, message: str, summary: str) -> Schema:
        ids = _ids_on(channel) or [message]
        result: Schema = {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel}"},
            "summary": summary,
            "messages": [{"$ref": f"#/channels/{channel}/messages/{m}"} for m in ids],
        }
        if action == "receive":
            result["bindings"] = {
                "kafka": {
                    "groupId": {
                        "type": "string",
                        "description": "`PAYMENT_CONSUMER_GROUP` (default `payment-service`).",
                    },
                    "bindingVersion": KAFKA_BINDING_VERSION,
                }
            }
        return result

    return {
        "receiveRequestPayment": operation(
            "receive",
            "sagaRequestPayment",
            "RequestPayment",
            "Take a payment request (deduplicated by ce_source and ce_id).",
        ),
        "sendPaymentInitiated": operation(
            "send", "paymentInitiated", "PaymentInitiated", "Announce an accepted payment."
        ),
        "receivePaymentInitiated": operation(
            "receive",
            "paymentInitiated",
            "PaymentInitiated",
            "Self-consumed: an initiated payment triggers its execution.",
        ),
        "sendPaymentCompleted": operation(
            "send", "paymentCompleted", "PaymentCompleted", "Publish a charged payment."
        ),
        "sendPaymentFailed": operation(
            "send", "paymentFailed", "PaymentFailed", "Publish a failed payment or a rejection."
        ),
        "receiveRefundPayment": operation(
            "receive",
            "sagaRefundPayment",
            "RefundPayment",
            "Take a refund request (deduplicated by ce_source and ce_id).",
        ),
        "sendPaymentRefunded": operation(
            "send", "paymentRefunded", "PaymentRefunded", "Publish a refund made."
        ),
        "sendPaymentRefundFailed": operation(
            "send",
            "paymentRefundFailed",
            "PaymentRefundFailed",
            "Publish a refund that failed or was refused.",
        ),
        "sendDeadLetter": operation(
            "send",
            DEAD_LETTER_CHANNEL,
            DEAD_LETTER,
            "Park a poison record (from any consumed topic); the partition keeps moving.",
        ),
    }
