"""docs/asyncapi.yaml is the generated contract, and what the service sends conforms to it.

Schemas are checked by `_validate` below, a strict subset of JSON Schema (the keywords the
document uses; any other keyword fails the test rather than being skipped): `jsonschema`
is not a dependency of the project (it pulls in a compiled extension).
"""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

import msgspec
import pytest
import yaml

from payment.adapters.kafka import dead_letters
from payment.adapters.kafka.cloudevents import decode_refund, decode_request, encode_outbound
from payment.adapters.kafka.dead_letters import KafkaDeadLetterPublisher
from payment.adapters.kafka.topics import Topics
from payment.application.commands import InboundRef, RefundPayment, RequestPayment, TraceHeaders
from payment.application.messages import (
    MESSAGE_VERSIONS,
    OutboundMessage,
    cancelled_message,
    dataschema_uri,
    initiated_message,
    outcome_message,
    refund_failed_message,
    refund_refused_message,
    refunded_message,
    rejection_message,
)
from payment.application.validation import Valid, validate_refund, validate_request
from payment.devtools import asyncapi
from payment.domain.events import FailureReason, PaymentRefunded, RefundFailed
from payment.domain.money import CURRENCY_EXPONENTS, DEFAULT_MAX_AMOUNT
from payment.domain.payment import Payment
from support.payments import initiate_payment
from support.record_senders import FakeRecordQueue, Outgoing
from support.records import ConsumedRecord

Schema = dict[str, Any]

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
TRACE = TraceHeaders(
    traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    tracestate="vendor=abc",
)


@pytest.fixture(scope="module")
def published() -> Schema:
    document: Schema = yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))
    return document


# --- the file is the generator's output ---------------------------------------------------


def test_published_document_is_the_generated_one() -> None:
    problem = asyncapi.drift(DOCUMENT, asyncapi.build_document())
    if problem is not None:
        pytest.fail(problem, pytrace=False)


def test_rendering_is_deterministic_and_round_trips() -> None:
    document = asyncapi.build_document()
    text = asyncapi.render(document)
    assert asyncapi.render(asyncapi.build_document()) == text
    assert yaml.safe_load(text) == document
    assert "&id" not in text  # no YAML anchors: every block reads on its own


def test_check_command_reports_drift_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "asyncapi.yaml"
    assert asyncapi.main(["--output", str(target)]) == 0
    assert asyncapi.main(["--check", "--output", str(target)]) == 0

    target.write_text(target.read_text().replace("maximum: 100000000", "maximum: 5"))
    capsys.readouterr()
    assert asyncapi.main(["--check", "--output", str(target)]) == 1
    err = capsys.readouterr().err
    assert "python -m payment.devtools.asyncapi" in err
    assert "-          maximum: 5" in err and "+          maximum: 100000000" in err

    assert asyncapi.main(["--check", "--output", str(tmp_path / "missing.yaml")]) == 1


# --- document structure -------------------------------------------------------------------


def test_asyncapi_3_with_the_contract_topics_and_operations(published: Schema) -> None:
    assert published["asyncapi"] == "3.0.0"
    assert published["info"]["version"] == "1.1.0"
    addresses = {channel["address"] for channel in published["channels"].values()}
    assert addresses == set(Topics().names)

    def address(operation: Schema) -> str:
        channel: str = _resolve(published, operation["channel"]["$ref"])["address"]
        return channel

    actions = {(op["action"], address(op)) for op in published["operations"].values()}
    assert actions == {
        ("receive", "saga.request_payment"),
        ("send", "payment.initiated"),
        ("receive", "payment.initiated"),
        ("send", "payment.completed"),
        ("send", "payment.failed"),
        ("send", "payment.dead_letter"),
        ("receive", "saga.refund_payment"),
        ("send", "payment.refunded"),
        ("send", "payment.refund_failed"),
    }


def test_every_ref_resolves(published: Schema) -> None:
    refs = list(_refs(published))
    assert refs
    for ref in refs:
        _resolve(published, ref)


def test_operation_messages_belong_to_their_channel(published: Schema) -> None:
    for name, operation in published["operations"].items():
        channel_ref = operation["channel"]["$ref"]
        for message in operation["messages"]:
            assert message["$ref"].startswith(f"{channel_ref}/messages/"), name


# --- payload schemas against the msgspec types --------------------------------------------


@pytest.mark.parametrize("spec", asyncapi.MESSAGES, ids=lambda spec: spec.id)
def test_payload_fields_and_required_match_the_msgspec_type(
    published: Schema, spec: asyncapi.MessageSpec
) -> None:
    schema = _payload_schema(published, spec.id)
    fields = msgspec.structs.fields(spec.struct)
    assert list(schema["properties"]) == [field.encode_name for field in fields]
    decoder_required = {
        field.encode_name for field in fields if field.required
    }  # what msgspec itself needs to decode
    overlay = asyncapi.OVERLAYS.get(spec.struct, asyncapi.Overlay())
    assert set(overlay.required).isdisjoint(decoder_required)
    assert set(schema["required"]) == decoder_required | set(overlay.required)


@pytest.mark.parametrize("spec", asyncapi.MESSAGES, ids=lambda spec: spec.id)
def test_payload_is_msgspec_schema_plus_only_the_overlay(
    published: Schema, spec: asyncapi.MessageSpec
) -> None:
    """Without its overlay, each payload schema is exactly what msgspec generates."""
    (ref,), components = msgspec.json.schema_components(
        [spec.struct], ref_template="#/components/schemas/{name}"
    )
    assert _payload_ref(published, spec.id) == ref
    generated = components[spec.struct.__name__]
    schema = _payload_schema(published, spec.id)
    overlay = asyncapi.OVERLAYS.get(spec.struct, asyncapi.Overlay())
    for name, field in generated["properties"].items():
        rules = overlay.fields.get(name, {})
        if name in overlay.required:
            # Made non-null: the generated non-null branch is kept.
            (field,) = [b for b in field["anyOf"] if b != {"type": "null"}]
        # (An overlay keyword msgspec also generated must agree: the generator checks it.)
        assert _without(schema["properties"][name], rules) == _without(field, rules)


def test_overlay_rules_are_the_services_own() -> None:
    request = _payload_schema(asyncapi.build_document(), "RequestPayment")["properties"]
    assert request["amount"]["minimum"] == 1
    assert request["amount"]["maximum"] == DEFAULT_MAX_AMOUNT
    assert request["currency"]["enum"] == sorted(CURRENCY_EXPONENTS)
    assert all(re.fullmatch("[A-Z]{3}", code) for code in request["currency"]["enum"])
    # The payment's own reasons, and `cancelled` for a booking a refund closed (4.8).
    assert sorted([*get_args(FailureReason), "cancelled"]) == list(asyncapi.FAILURE_REASONS)
    failed = _payload_schema(asyncapi.build_document(), "PaymentFailedV1")["properties"]
    assert failed["reason"]["enum"] == sorted([*get_args(FailureReason), "cancelled"])
    refund_failed = _payload_schema(asyncapi.build_document(), "PaymentRefundFailedV1")
    assert refund_failed["properties"]["reason"]["enum"] == [
        "declined",
        "invalid_request",
        "not_charged",
        "over_refund",
    ]
    refund = _payload_schema(asyncapi.build_document(), "RefundPayment")["properties"]
    assert refund["booking_id"]["pattern"] == asyncapi.BOOKING_ID_PATTERN
    for name in ("PaymentInitiatedV1", "PaymentCompletedV1"):
        props = _payload_schema(asyncapi.build_document(), name)["properties"]
        assert props["currency"]["enum"] == sorted(CURRENCY_EXPONENTS)


def test_dead_letter_header_names_are_the_publishers() -> None:
    assert asyncapi.DLQ_HEADERS == (
        dead_letters.DLQ_REASON,
        dead_letters.DLQ_ORIGINAL_TOPIC,
        dead_letters.DLQ_ORIGINAL_PARTITION,
        dead_letters.DLQ_ORIGINAL_OFFSET,
        dead_letters.DLQ_CONSUMER_GROUP,
    )
    assert asyncapi.DLQ_DROPPED_HEADERS == (
        dead_letters.DLQ_VALUE_DROPPED,
        dead_letters.DLQ_HEADERS_DROPPED,
        dead_letters.DLQ_KEY_DROPPED,
    )
    assert asyncapi.DLQ_CARD_NUMBERS_MASKED == dead_letters.DLQ_CARD_NUMBERS_MASKED
    assert asyncapi.DLQ_MASKED_PARTS == (
        dead_letters.MASKED_VALUE,
        dead_letters.MASKED_KEY,
        dead_letters.MASKED_HEADERS,
    )


def _request_samples() -> Iterator[Schema]:
    base: Schema = {
        "booking_id": "booking-1",
        "amount": 1999,
        "currency": "EUR",
        "payment_method": "pm_card_visa",
    }
    yield base
    for booking_id in ("", "a" * 64, "a" * 65, "ok.:_-AZaz09", "bad id", "b-1\n", "bé"):
        yield {**base, "booking_id": booking_id}
    for amount in (-5, 0, 1, DEFAULT_MAX_AMOUNT, DEFAULT_MAX_AMOUNT + 1, None):
        yield {**base, "amount": amount}
    for currency in (*CURRENCY_EXPONENTS, "eur", "XXX", "EURO", "", None):
        yield {**base, "currency": currency}
    for method in ("", "x", "x" * 255, "x" * 256, None):
        yield {**base, "payment_method": method}
    for optional in ("customer_id", "saga_id"):
        for value in (None, "", "c" * 64, "c" * 65):
            yield {**base, optional: value}
    for missing in ("amount", "currency", "payment_method"):
        yield {key: value for key, value in base.items() if key != missing}


@pytest.mark.parametrize("data", list(_request_samples()))
def test_request_schema_accepts_exactly_what_validation_accepts(
    published: Schema, data: Schema
) -> None:
    """The overlaid rules agree with payment.application.validation, case by case.

    (The card-number rule is beyond JSON Schema: it is stated in words, and no sample here
    is card-like.)
    """
    message = decode_request(msgspec.json.encode(data))  # every sample decodes: a rule break
    command = RequestPayment(
        inbound=InboundRef(source="orchestrator", message_id="m-1"),
        booking_id=message.booking_id,
        amount=message.amount,
        currency=message.currency,
        payment_method=message.payment_method,
        customer_id=message.customer_id,
        saga_id=message.saga_id,
    )
    accepted = isinstance(validate_request(command, max_amount=DEFAULT_MAX_AMOUNT), Valid)
    problems = _validate(published, _payload_schema(published, "RequestPayment"), data)
    assert (not problems) == accepted, problems


def _refund_samples() -> Iterator[Schema]:
    base: Schema = {"booking_id": "booking-1"}
    yield base
    for booking_id in ("", "a" * 64, "a" * 65, "bad id", "bé"):
        yield {**base, "booking_id": booking_id}
    for amount in (-5, 0, 1, DEFAULT_MAX_AMOUNT, DEFAULT_MAX_AMOUNT + 1, None):
        yield {**base, "amount": amount}
    for reason in (None, "", "r" * 255, "r" * 256):
        yield {**base, "reason": reason}
    for saga_id in (None, "", "s" * 64, "s" * 65):
        yield {**base, "saga_id": saga_id}


@pytest.mark.parametrize("data", list(_refund_samples()))
def test_refund_schema_accepts_exactly_what_validation_accepts(
    published: Schema, data: Schema
) -> None:
    """As for requests: the RefundPayment overlay agrees with `validate_refund`."""
    message = decode_refund(msgspec.json.encode(data))
    command = RefundPayment(
        inbound=InboundRef(source="orchestrator", message_id="m-1"),
        booking_id=message.booking_id,
        amount=message.amount,
        reason=message.reason,
        saga_id=message.saga_id,
    )
    accepted = validate_refund(command, max_amount=DEFAULT_MAX_AMOUNT) is None
    problems = _validate(published, _payload_schema(published, "RefundPayment"), data)
    assert (not problems) == accepted, problems


# --- what the service sends conforms ------------------------------------------------------


def _payment() -> Payment:
    payment, _ = initiate_payment(booking_id="booking-1", amount=1999, saga_id="saga-1", at=T0)
    return payment


def _outbound_samples() -> Iterator[tuple[str, OutboundMessage]]:
    payment = _payment()
    yield "PaymentInitiatedV1", initiated_message(payment, TRACE)
    completed = _payment()
    completed.complete(processor="fake", provider_reference="fake_ch_1", at=T0)
    yield "PaymentCompletedV1", outcome_message(completed, TRACE)
    declined = _payment()
    declined.fail(reason="declined", detail="card declined", at=T0, decline_code="do_not_honor")
    yield "PaymentFailedV1", outcome_message(declined, TraceHeaders())
    yield (
        "PaymentFailedV1",
        rejection_message(
            booking_id="not a valid booking id!",
            saga_id="s" * 100,
            detail="booking_id must be 1-64 characters of A-Z a-z 0-9 . _ : -",
            at=T0,
            trace=TRACE,
        ),
    )
    yield (
        "PaymentFailedV1",
        cancelled_message(booking_id="booking-1", saga_id="saga-1", at=T0, trace=TRACE),
    )
    refunded = _payment()
    refunded.complete(processor="fake", provider_reference="fake_ch_1", at=T0)
    refunded.request_refund(
        refund_id=uuid.uuid4(), amount=500, reason="trip cancelled", saga_id="saga-1", at=T0
    )
    (done,) = refunded.complete_refund(
        refund_id=next(iter(refunded.refunds)), processor="fake", provider_reference="re_1", at=T0
    )
    assert isinstance(done, PaymentRefunded)
    yield "PaymentRefundedV1", refunded_message(refunded, done, TRACE)
    waiting = _payment()
    waiting.request_refund(refund_id=uuid.uuid4(), amount=None, reason=None, saga_id=None, at=T0)
    waiting.fail(reason="declined", detail="card declined", at=T0)
    (not_charged,) = waiting.fail_refund(
        refund_id=next(iter(waiting.refunds)), reason="not_charged", detail="not charged", at=T0
    )
    assert isinstance(not_charged, RefundFailed)
    yield "PaymentRefundFailedV1", refund_failed_message(waiting, not_charged, TRACE)
    yield (
        "PaymentRefundFailedV1",
        refund_refused_message(
            booking_id="booking-9",
            saga_id="saga-9",
            reason="not_charged",
            detail="the booking has no payment",
            at=T0,
            trace=TRACE,
        ),
    )
    yield (
        "PaymentRefundFailedV1",
        refund_refused_message(
            booking_id="booking-1",
            saga_id=None,
            reason="over_refund",
            detail="nothing left",
            at=T0,
            trace=TRACE,
            payment=refunded,
        ),
    )


@pytest.mark.parametrize(
    ("name", "message"), list(_outbound_samples()), ids=lambda v: getattr(v, "type", v)
)
def test_outbound_records_conform(published: Schema, name: str, message: OutboundMessage) -> None:
    record = encode_outbound(message, source="payment-service", topic_for=Topics().outbound)
    spec = _message(published, name)

    assert record.topic == _channel_of(published, name)["address"]
    payload = msgspec.json.decode(record.value)
    assert _validate(published, spec["payload"], payload) == []
    assert _validate(published, spec["headers"], _header_map(record.headers)) == []
    key = spec["bindings"]["kafka"]["key"]
    assert _validate(published, key, record.key.decode()) == []


@pytest.mark.parametrize("kind", sorted(MESSAGE_VERSIONS))
def test_every_schema_version_of_an_outbound_type_is_listed(published: Schema, kind: str) -> None:
    """Version 1 to the current one, each a message of the type's channel, told apart by
    its `ce_dataschema`; a record queued before an upgrade may still carry any of them."""
    channels = [
        channel
        for channel in published["channels"].values()
        if channel["address"] == Topics().outbound[kind]
    ]
    (channel,) = channels
    listed = {
        _resolve(published, _resolve(published, ref["$ref"])["headers"]["$ref"])["properties"][
            "ce_dataschema"
        ]["const"]
        for ref in channel["messages"].values()
    }
    assert listed == {dataschema_uri(kind, n) for n in range(1, MESSAGE_VERSIONS[kind] + 1)}


def test_outbound_records_carry_the_current_schema_version() -> None:
    for _, message in _outbound_samples():
        record = encode_outbound(message, source="payment-service", topic_for=Topics().outbound)
        assert _header_map(record.headers)["ce_dataschema"] == dataschema_uri(
            message.type, MESSAGE_VERSIONS[message.type]
        )


def test_a_valid_request_record_conforms_and_decodes(published: Schema) -> None:
    data = {"booking_id": "booking-1", "amount": 1, "currency": "JPY", "payment_method": "tok"}
    headers = {
        "ce_specversion": "1.0",
        "ce_id": "req-1",
        "ce_source": "booking-orchestrator",
        "ce_type": "saga.request_payment",
        "ce_time": "2030-01-01T12:00:00Z",
        "content-type": "application/json",
        "traceparent": TRACE.traceparent,
    }
    spec = _message(published, "RequestPayment")
    assert _validate(published, spec["payload"], data) == []
    assert _validate(published, spec["headers"], headers) == []
    assert decode_request(msgspec.json.encode(data)).amount == 1
    assert _validate(published, spec["headers"], {**headers, "ce_specversion": "0.3"})
    assert _validate(published, spec["headers"], {**headers, "ce_time": "yesterday"})


class _Sender(FakeRecordQueue):
    """Acknowledges every record at once and keeps it in `sent`."""

    def __init__(self) -> None:
        self.sent: list[Outgoing] = []

    async def deliver(self, record: Outgoing) -> object:
        self.sent.append(record)
        return None


async def test_dead_letters_conform(published: Schema) -> None:
    sender = _Sender()
    publisher = KafkaDeadLetterPublisher(sender, Topics().dead_letter, "payment-service")
    poison = ConsumedRecord(
        topic="saga.request_payment",
        partition=3,
        offset=42,
        key=b"booking-1",
        value=b"not json",
        headers=[("ce_type", b"saga.request_payment"), ("dlq_reason", b"stale")],
    )
    await publisher.publish(poison, "saga.request_payment data is not valid UTF-8 JSON")

    ((topic, key, _, headers),) = sender.sent
    spec = _message(published, "DeadLetter")
    assert topic == _channel_of(published, "DeadLetter")["address"]
    assert key == poison.key
    assert _validate(published, spec["headers"], _header_map(headers)) == []


async def test_dead_letters_with_card_numbers_masked_conform(published: Schema) -> None:
    spec = _message(published, "DeadLetter")
    card = b"4111 1111 1111 1111"
    for n in range(1, len(asyncapi.DLQ_MASKED_PARTS) + 1):
        for parts in itertools.combinations(asyncapi.DLQ_MASKED_PARTS, n):
            sender = _Sender()
            publisher = KafkaDeadLetterPublisher(sender, Topics().dead_letter, "payment-service")
            poison = ConsumedRecord(
                topic="saga.request_payment",
                partition=0,
                offset=1,
                key=card if "key" in parts else b"booking-1",
                value=card if "value" in parts else b"not json",
                headers=[
                    ("ce_type", b"saga.request_payment"),
                    ("x", card if "headers" in parts else b""),
                ],
            )
            await publisher.publish(poison, "poison")
            ((_, _, _, headers),) = sender.sent
            masked = _header_map(headers)
            assert masked[asyncapi.DLQ_CARD_NUMBERS_MASKED] == ",".join(parts)
            assert _validate(published, spec["headers"], masked) == []
    # The last valid set of headers, with only the masked parts wrong: each must be refused.
    base = {k: v for k, v in masked.items() if k != asyncapi.DLQ_CARD_NUMBERS_MASKED}
    assert _validate(published, spec["headers"], base) == []
    for wrong in ("key,value", "value,value", "", "body"):
        assert _validate(published, spec["headers"], {**base, "dlq_card_numbers_masked": wrong})


# --- the strict-subset validator ----------------------------------------------------------

_ANNOTATIONS = {"title", "description", "default", "examples"}
_ASSERTIONS = {
    "$ref",
    "anyOf",
    "type",
    "enum",
    "const",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "format",
    "properties",
    "required",
}
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
    "object": (dict,),
    "array": (list,),
}


def _validate(root: Schema, schema: Schema, value: Any, at: str = "$") -> list[str]:
    """What is wrong with `value` under `schema` (refs resolved in `root`); [] if nothing."""
    unknown = set(schema) - _ANNOTATIONS - _ASSERTIONS
    if unknown:
        raise AssertionError(f"validator does not implement {sorted(unknown)} (at {at})")
    if "$ref" in schema:
        return _validate(root, _resolve(root, schema["$ref"]), value, at)
    if "anyOf" in schema:
        if all(_validate(root, branch, value, at) for branch in schema["anyOf"]):
            return [f"{at}: matches no branch of anyOf"]
        return []
    problems: list[str] = []
    if "type" in schema:
        is_bool = isinstance(value, bool)
        if not isinstance(value, _TYPES[schema["type"]]) or (
            is_bool and schema["type"] != "boolean"
        ):
            return [f"{at}: not of type {schema['type']}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{at}: not one of the enum")
    if "const" in schema and value != schema["const"]:
        problems.append(f"{at}: not {schema['const']!r}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            problems.append(f"{at}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            problems.append(f"{at}: longer than {schema['maxLength']}")
        if "pattern" in schema and not _ecma_search(schema["pattern"], value):
            problems.append(f"{at}: does not match {schema['pattern']}")
        if "format" in schema and not _format_ok(schema["format"], value):
            problems.append(f"{at}: not a {schema['format']}")
    if isinstance(value, int) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{at}: below {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{at}: above {schema['maximum']}")
    if isinstance(value, dict):
        for name in schema.get("required", ()):
            if name not in value:
                problems.append(f"{at}: missing {name}")
        for name, field in schema.get("properties", {}).items():
            if name in value:
                problems += _validate(root, field, value[name], f"{at}.{name}")
    return problems


def _ecma_search(pattern: str, value: str) -> bool:
    # ECMA-262's `$` (no multiline flag) matches only at the very end, Python's also before
    # a final newline.
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.search(pattern, value) is not None


def _format_ok(name: str, value: str) -> bool:
    if name == "date-time":
        if not _RFC3339.fullmatch(value):
            return False
        try:
            datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
        except ValueError:
            return False
        return True
    if name == "uuid":
        return _UUID.fullmatch(value.lower()) is not None
    raise AssertionError(f"validator does not implement format {name!r}")


def test_validator_is_strict() -> None:
    with pytest.raises(AssertionError, match="does not implement"):
        _validate({}, {"type": "string", "oneOf": []}, "x")
    assert _validate({}, {"type": "integer"}, True)
    assert _validate({}, {"type": "string", "format": "date-time"}, "2030-01-01T12:00:00")
    assert not _validate({}, {"type": "string", "format": "date-time"}, "2030-01-01T12:00:00Z")
    assert _validate({}, {"type": "string", "format": "uuid"}, "not-a-uuid")


# --- helpers ------------------------------------------------------------------------------


def _resolve(root: Schema, ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _message(document: Schema, name: str) -> Schema:
    message: Schema = document["components"]["messages"][name]
    return message


def _channel_of(document: Schema, message: str) -> Schema:
    (channel,) = [
        channel for channel in document["channels"].values() if message in channel["messages"]
    ]
    return channel  # type: ignore[no-any-return]


def _payload_ref(document: Schema, name: str) -> Schema:
    ref: Schema = _message(document, name)["payload"]
    return ref


def _payload_schema(document: Schema, name: str) -> Schema:
    schema: Schema = _resolve(document, _payload_ref(document, name)["$ref"])
    return schema


def _without(field: Schema, rules: Schema) -> Schema:
    """`field` with the overlay's keywords taken out again, wherever they were put."""

    def strip(node: Schema) -> Schema:
        return {key: value for key, value in node.items() if key not in rules}

    stripped = strip(field)
    if "anyOf" in stripped:
        stripped["anyOf"] = [strip(branch) for branch in stripped["anyOf"]]
    return stripped


def _header_map(headers: Sequence[tuple[str, bytes | None]]) -> dict[str, str]:
    names = [name for name, _ in headers]
    assert len(names) == len(set(names)), f"duplicated headers: {names}"
    return {name: (value or b"").decode() for name, value in headers}
