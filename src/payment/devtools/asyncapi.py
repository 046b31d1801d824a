"""The published contract as AsyncAPI 3.0, generated from the msgspec message types."""

from __future__ import annotations

import argparse
import difflib
import inspect
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

import msgspec
import yaml

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
from payment.adapters.kafka.topics import Topics
from payment.application.messages import (
    MESSAGE_VERSIONS,
    PAYMENT_COMPLETED,
    PAYMENT_FAILED,
    PAYMENT_INITIATED,
    PAYMENT_REFUND_FAILED,
    PAYMENT_REFUNDED,
    PUBLISHED_FAILURE_REASONS,
    REFUND_FAILED_REASONS,
    REFUND_PAYMENT,
    REQUEST_PAYMENT,
    PaymentCompletedMessage,
    PaymentFailedMessage,
    PaymentInitiatedMessage,
    PaymentRefundedMessage,
    PaymentRefundFailedMessage,
    RefundPaymentMessage,
    RequestPaymentMessage,
    dataschema_uri,
)
from payment.domain.money import CURRENCY_EXPONENTS, DEFAULT_MAX_AMOUNT

Schema = dict[str, Any]

DOCUMENT_PATH: Final = Path("docs/asyncapi.yaml")
REGENERATE: Final = "python -m payment.devtools.asyncapi"
ASYNCAPI_VERSION: Final = "3.0.0"
# 1.1.0: refunds (saga.refund_payment, payment.refunded, payment.refund_failed) and the
# `cancelled` reason of payment.failed (contract v2, 4.8).
CONTRACT_VERSION: Final = "1.1.0"
KAFKA_BINDING_VERSION: Final = "0.5.0"

# --- Rules of contract section 3 that the msgspec types do not carry ----------------------
#
# The message types are lenient on purpose: a request that decodes but breaks a rule must
# be answered with `payment.failed` / `invalid_request` (contract 4.4), not dead-lettered as
# undecodable (4.5), so `msgspec.Meta` constraints on them would change behaviour. The rules
# are overlaid on the generated schemas here instead; tests/contract/test_asyncapi.py checks
# them against payment.application.validation and payment.domain.money.

BOOKING_ID_PATTERN: Final = r"^[A-Za-z0-9._:-]{1,64}$"
MAX_ID_CHARS: Final = 64
MAX_PAYMENT_METHOD_CHARS: Final = 255
MIN_AMOUNT: Final = 1
CURRENCIES: Final = tuple(sorted(CURRENCY_EXPONENTS))
FAILURE_REASONS: Final = tuple(sorted(PUBLISHED_FAILURE_REASONS))
MAX_REASON_CHARS: Final = 255

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

_UUID: Final[Schema] = {"format": "uuid"}
_TIMESTAMP: Final[Schema] = {"format": "date-time", "description": "RFC 3339, UTC."}
_VERSION: Final[Schema] = {
    "minimum": 1,
    "description": "The event's version in its payment stream (also sent as `ce_sequence`).",
}
_CURRENCY: Final[Schema] = {
    "enum": list(CURRENCIES),
    "description": "ISO 4217 alphabetic code, uppercase, from the service's allowlist.",
}


class Overlay(NamedTuple):
    """Contract rules added to the generated schema of one message type.

    `required` lists optional fields of the type that a valid message must carry anyway
    (non-null); `fields` maps a field to the JSON Schema keywords it gains (on the non-null
    branch of a nullable field). Naming an unknown field, or contradicting a keyword msgspec
    generated, raises `ValueError`, so an overlay cannot silently outlive its field.
    """

    required: tuple[str, ...] = ()
    fields: Mapping[str, Schema] = {}


OVERLAYS: Final[Mapping[type[msgspec.Struct], Overlay]] = {
    RequestPaymentMessage: Overlay(
        required=("amount", "currency", "payment_method"),
        fields={
            "booking_id": {
                "pattern": BOOKING_ID_PATTERN,
                "minLength": 1,
                "maxLength": MAX_ID_CHARS,
                "description": "The booking to charge; one payment per booking.",
            },
            "amount": {
                "minimum": MIN_AMOUNT,
                "maximum": DEFAULT_MAX_AMOUNT,
                "description": (
                    "Integer number of minor units of `currency` (not a float, not a string). "
                    "The maximum is the default of `PAYMENT_MAX_AMOUNT`; a deployment may set "
                    "another."
                ),
            },
            "currency": _CURRENCY,
            "payment_method": {
                "minLength": 1,
                "maxLength": MAX_PAYMENT_METHOD_CHARS,
                "description": (
                    "Gateway token. A 13-19 digit Luhn-valid number (a card number) is "
                    "rejected with `invalid_request` and never stored, logged or published."
                ),
            },
            "customer_id": {"maxLength": MAX_ID_CHARS},
            "saga_id": {
                "maxLength": MAX_ID_CHARS,
                "description": "Echoed on every outcome event.",
            },
        },
    ),
    PaymentInitiatedMessage: Overlay(
        fields={
            "payment_id": _UUID,
            "booking_id": {"pattern": BOOKING_ID_PATTERN},
            "saga_id": {"maxLength": MAX_ID_CHARS},
            "amount": {"minimum": MIN_AMOUNT},
            "currency": _CURRENCY,
            "customer_id": {"maxLength": MAX_ID_CHARS},
            "initiated_at": _TIMESTAMP,
            "version": _VERSION,
        },
    ),
    PaymentCompletedMessage: Overlay(
        fields={
            "payment_id": _UUID,
            "booking_id": {"pattern": BOOKING_ID_PATTERN},
            "saga_id": {"maxLength": MAX_ID_CHARS},
            "amount": {"minimum": MIN_AMOUNT},
            "currency": _CURRENCY,
            "processor": {"description": "The gateway that charged, e.g. `fake`, `stripe`."},
            "provider_reference": {"description": "The gateway's id of the charge."},
            "completed_at": _TIMESTAMP,
            "version": _VERSION,
        },
    ),
    # booking_id and saga_id are echoed as received: a rejection may carry invalid ones.
    PaymentFailedMessage: Overlay(
        fields={
            "payment_id": {**_UUID, "description": "Absent when no payment was created."},
            "reason": {
                "enum": list(FAILURE_REASONS),
                "description": (
                    "`declined` by the gateway; `invalid_request` (a rule of the request was "
                    "broken, no processor call); `processor_unavailable` (the gateway could "
                    "not be reached and no charge can have happened); `cancelled` (a refund "
                    "for the booking arrived before its payment request and closed it: "
                    "nothing was charged, no payment exists)."
                ),
            },
            "detail": {"description": "Human-readable; never secrets or card data."},
            "failed_at": _TIMESTAMP,
            "version": {**_VERSION, "description": "Absent when no payment was created."},
        },
    ),
    RefundPaymentMessage: Overlay(
        fields={
            "booking_id": {
                "pattern": BOOKING_ID_PATTERN,
                "minLength": 1,
                "maxLength": MAX_ID_CHARS,
                "description": "The booking whose payment to refund.",
            },
            "amount": {
                "minimum": MIN_AMOUNT,
                "maximum": DEFAULT_MAX_AMOUNT,
                "description": (
                    "Minor units to refund, at most what is still refundable; absent: all "
                    "that is still refundable (nothing left: `over_refund`)."
                ),
            },
            "reason": {
                "maxLength": MAX_REASON_CHARS,
                "description": "Stored with the refund; never card data.",
            },
            "saga_id": {"maxLength": MAX_ID_CHARS, "description": "Echoed on the outcome."},
        },
    ),
    PaymentRefundedMessage: Overlay(
        fields={
            "payment_id": _UUID,
            "booking_id": {"pattern": BOOKING_ID_PATTERN},
            "saga_id": {"maxLength": MAX_ID_CHARS},
            "refund_id": {**_UUID, "description": "One per refund request."},
            "amount": {"minimum": MIN_AMOUNT, "description": "This refund's amount."},
            "refunded_total": {
                "minimum": MIN_AMOUNT,
                "description": "All refunded of the payment so far, this refund included.",
            },
            "currency": _CURRENCY,
            "provider_reference": {"description": "The gateway's id of the refund."},
            "refunded_at": _TIMESTAMP,
            "version": _VERSION,
        },
    ),
    PaymentRefundFailedMessage: Overlay(
        fields={
            "payment_id": {**_UUID, "description": "Absent when the booking has no payment."},
            "refund_id": {**_UUID, "description": "Absent when no refund was created."},
            "reason": {
                "enum": sorted(REFUND_FAILED_REASONS),
                "description": (
                    "`not_charged` (the payment failed, or never existed: the booking is then "
                    "closed); `over_refund` (more than is still refundable); `declined` by the "
                    "gateway; `invalid_request` (a rule of the request was broken)."
                ),
            },
            "detail": {"description": "Human-readable; never secrets or card data."},
            "failed_at": _TIMESTAMP,
            "version": {
                **_VERSION,
                "description": "The payment stream's version; absent when there is no payment.",
            },
        },
    ),
}


def apply_overlay(schema: Schema, overlay: Overlay) -> Schema:
    """`schema` (one generated object schema) with the overlay's rules added; a new dict."""
    result: Schema = msgspec.json.decode(msgspec.json.encode(schema))  # a deep copy
    properties: dict[str, Schema] = result["properties"]
    for name in (*overlay.required, *overlay.fields):
        if name not in properties:
            raise ValueError(f"overlay names {name!r}, not a field of {result.get('title')}")
    for name in overlay.required:
        properties[name] = _without_null(properties[name])
    for name, rules in overlay.fields.items():
        # Annotations describe the field; assertions constrain its (non-null) value.
        notes = {key: value for key, value in rules.items() if key in _ANNOTATIONS}
        checks = {key: value for key, value in rules.items() if key not in _ANNOTATIONS}
        _merge(properties[name], notes, name)
        _merge(_non_null_branch(properties[name]), checks, name)
    required = set(result.get("required", ())) | set(overlay.required)
    result["required"] = [name for name in properties if name in required]
    return result


_ANNOTATIONS: Final = frozenset({"title", "description", "examples"})


def _without_null(field: Schema) -> Schema:
    branches = field.get("anyOf")
    if branches is None:
        return field
    kept = [branch for branch in branches if branch != {"type": "null"}]
    if len(kept) != 1:
        raise ValueError(f"cannot make a required field of {field}")
    rest = {key: value for key, value in field.items() if key not in ("anyOf", "default")}
    return {**kept[0], **rest}


def _non_null_branch(field: Schema) -> Schema:
    branches = field.get("anyOf")
    if branches is None:
        return field
    kept = [branch for branch in branches if branch != {"type": "null"}]
    if len(kept) != 1:
        raise ValueError(f"cannot apply rules to {field}")
    target: Schema = kept[0]
    return target


def _merge(target: Schema, rules: Schema, name: str) -> None:
    for key, value in rules.items():
        if key in target and target[key] != value:
            raise ValueError(f"overlay on {name!r} contradicts generated {key!r}")
        target[key] = value


# --- Messages, channels, operations -------------------------------------------------------


class MessageSpec(NamedTuple):
    """One message of the contract, at one schema version, and where it travels.

    Outbound messages are listed once per schema version (`version`; None for the inbound
    request, whose shape the orchestrator owns): a row queued by an earlier release is
    still published under its own version, so a version's entry stays when a newer one is
    added (its struct kept, renamed `…MessageV<N>`).
    """

    name: str
    channel: str
    topic_field: str
    ce_type: str
    struct: type[msgspec.Struct]
    summary: str
    key: Schema
    version: int | None = None

    @property
    def id(self) -> str:
        """The message's key in the document: its name, with `V<version>` when versioned."""
        return self.name if self.version is None else f"{self.name}V{self.version}"


MESSAGES: Final = (
    MessageSpec(
        name="RequestPayment",
        channel="sagaRequestPayment",
        topic_field="request",
        ce_type=REQUEST_PAYMENT,
        struct=RequestPaymentMessage,
        summary="The orchestrator asks to charge a booking.",
        key={"type": "string", "description": "The booking id."},
    ),
    MessageSpec(
        name="PaymentInitiated",
        channel="paymentInitiated",
        topic_field="initiated",
        ce_type=PAYMENT_INITIATED,
        struct=PaymentInitiatedMessage,
        summary="A payment was accepted for a booking; its outcome follows.",
        key={"type": "string", "format": "uuid", "description": "The payment id."},
        version=MESSAGE_VERSIONS[PAYMENT_INITIATED],
    ),
    MessageSpec(
        name="PaymentCompleted",
        channel="paymentCompleted",
        topic_field="completed",
        ce_type=PAYMENT_COMPLETED,
        struct=PaymentCompletedMessage,
        summary="The payment was charged (terminal).",
        key={"type": "string", "format": "uuid", "description": "The payment id."},
        version=MESSAGE_VERSIONS[PAYMENT_COMPLETED],
    ),
    MessageSpec(
        name="PaymentFailed",
        channel="paymentFailed",
        topic_field="failed",
        ce_type=PAYMENT_FAILED,
        struct=PaymentFailedMessage,
        summary="The payment ended without a charge, or the request was rejected (terminal).",
        key={
            "type": "string",
            "description": (
                "The payment id; the booking id for a rejected request that created no payment."
            ),
        },
        version=MESSAGE_VERSIONS[PAYMENT_FAILED],
    ),
    MessageSpec(
        name="RefundPayment",
        channel="sagaRefundPayment",
        topic_field="refund",
        ce_type=REFUND_PAYMENT,
        struct=RefundPaymentMessage,
        summary="The orchestrator asks to refund a booking's payment (its compensation).",
        key={"type": "string", "description": "The booking id."},
    ),
    MessageSpec(
        name="PaymentRefunded",
        channel="paymentRefunded",
        topic_field="refunded",
        ce_type=PAYMENT_REFUNDED,
        struct=PaymentRefundedMessage,
        summary="A refund went through at the gateway (terminal for that refund).",
        key={"type": "string", "format": "uuid", "description": "The payment id."},
        version=MESSAGE_VERSIONS[PAYMENT_REFUNDED],
    ),
    MessageSpec(
        name="PaymentRefundFailed",
        channel="paymentRefundFailed",
        topic_field="refund_failed",
        ce_type=PAYMENT_REFUND_FAILED,
        struct=PaymentRefundFailedMessage,
        summary="A refund request ended without money going back (terminal for that request).",
        key={
            "type": "string",
            "description": "The payment id; the booking id when the booking has no payment.",
        },
        version=MESSAGE_VERSIONS[PAYMENT_REFUND_FAILED],
    ),
)

DEAD_LETTER: Final = "DeadLetter"
DEAD_LETTER_CHANNEL: Final = "paymentDeadLetter"

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
        schemas[f"{spec.id}Headers"] = _cloudevents_headers(spec)
    schemas[f"{DEAD_LETTER}Headers"] = _dead_letter_headers()

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


def _cloudevents_headers(spec: MessageSpec) -> Schema:
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


def _dead_letter_headers() -> Schema:
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


# --- Rendering and the command ------------------------------------------------------------

_HEADER: Final = (
    f"# Generated by `{REGENERATE}` from the msgspec types in payment.application.messages.\n"
    "# Do not edit by hand: tests/contract/test_asyncapi.py fails when the two drift apart.\n"
)


class _Dumper(yaml.SafeDumper):
    """Block style, multi-line strings as literal blocks, no anchors: stable, readable diffs."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def render(document: Schema) -> str:
    """The document as YAML text; the same document always renders to the same text."""
    body: str = yaml.dump(
        document,
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=100,
    )
    return _HEADER + body


def drift(path: Path, document: Schema) -> str | None:
    """None if the file at `path` holds `document`, else what differs and how to fix it."""
    fix = f"Regenerate it: `{REGENERATE}` (from the repository root), and commit the result."
    try:
        published = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror}). {fix}"
    except yaml.YAMLError as exc:
        return f"{path} is not valid YAML ({exc}). {fix}"
    if published == document:
        return None
    published_text = render(published) if isinstance(published, dict) else str(published)
    diff = difflib.unified_diff(
        published_text.splitlines(keepends=True),
        render(document).splitlines(keepends=True),
        fromfile=f"{path} (published)",
        tofile="generated from the msgspec types",
    )
    return f"{path} differs from the generated contract. {fix}\n{''.join(diff)}"


def main(argv: Sequence[str] | None = None) -> int:
    """Write the AsyncAPI document, or with `--check` fail if the published one drifted."""
    parser = argparse.ArgumentParser(
        prog="python -m payment.devtools.asyncapi",
        description="Generate (or check) the AsyncAPI 3.0 document of the payment contract.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 with a diff if the file differs from the generated one",
    )
    parser.add_argument("--output", type=Path, default=DOCUMENT_PATH, help="%(default)s")
    args = parser.parse_args(argv)
    path: Path = args.output
    document = build_document()
    if args.check:
        problem = drift(path, document)
        if problem is not None:
            print(problem, file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(document), encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
