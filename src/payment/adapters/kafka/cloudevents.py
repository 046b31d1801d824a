"""CloudEvents 1.0 Kafka protocol binding, binary content mode (contract section 2)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Final, NamedTuple, TypeVar

import msgspec

from payment.application.messages import (
    OutboundMessage,
    PaymentInitiatedMessage,
    RefundPaymentMessage,
    RequestPaymentMessage,
    dataschema_uri,
)
from payment.application.ports import ConsumedRecord

SPECVERSION: Final = "1.0"
CONTENT_TYPE: Final = "application/json"
# Checked against the raw value before anything is parsed (contract section 4.5).
MAX_VALUE_BYTES: Final = 64 * 1024
# Bounds what an inbound attribute can make us store (the inbox key) or log.
MAX_ATTRIBUTE_BYTES: Final = 1024
MAX_TRACESTATE_CHARS: Final = 512
# `ce_sequence` is the event's version in its payment stream, zero-padded to this many
# digits so that sequences sort as strings (CloudEvents' sequence extension compares
# them as strings); earlier releases sent them unpadded, which still decode.
SEQUENCE_DIGITS: Final = 10

H_SPECVERSION: Final = "ce_specversion"
H_ID: Final = "ce_id"
H_SOURCE: Final = "ce_source"
H_TYPE: Final = "ce_type"
H_TIME: Final = "ce_time"
H_SUBJECT: Final = "ce_subject"
H_SEQUENCE: Final = "ce_sequence"
H_DATASCHEMA: Final = "ce_dataschema"
H_CONTENT_TYPE: Final = "content-type"
H_TRACEPARENT: Final = "traceparent"
H_TRACESTATE: Final = "tracestate"

_REQUIRED: Final = (H_SPECVERSION, H_ID, H_SOURCE, H_TYPE)
# An ambiguous envelope (two ids, two types…) cannot be deduplicated or routed safely.
_SINGLE_VALUED: Final = (*_REQUIRED, H_TIME, H_SUBJECT, H_CONTENT_TYPE)
_TRACE: Final = (H_TRACEPARENT, H_TRACESTATE)
# What `_header_attributes` reads: every other header is passed over.
_ENVELOPE: Final = frozenset((*_SINGLE_VALUED, *_TRACE))

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACESTATE = re.compile(r"[\x20-\x7e]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

_T = TypeVar("_T")
_AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]

# msgspec's own wording for these two failures names only types and field paths, never
# a value, so it is safe to pass on; anything else gets a generic reason.
_SAFE_VALIDATION = re.compile(
    r"(Expected `[^`']{1,80}`, got `[^`']{1,40}`|Object missing required field `[a-z_]{1,40}`)"
    r"( - at `\$(\.[a-z_]{1,40})*`)?"
)


class PoisonMessage(Exception):
    """A message that can never be processed: it goes to the dead-letter topic.

    `reason` is short and never contains the payload (it may hold card data).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InboundEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A decoded CloudEvents envelope of a consumed record; `data` is still raw JSON."""

    source: str
    id: str
    type: str
    time: datetime | None
    subject: str | None
    traceparent: str | None
    tracestate: str | None
    data: bytes
    topic: str
    partition: int
    offset: int
    key: bytes | None


class EncodedRecord(NamedTuple):
    """A Kafka record ready for the producer."""

    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


def decode_record(record: ConsumedRecord, *, expected_type: str | None = None) -> InboundEvent:
    """The CloudEvents envelope of an aiokafka `ConsumerRecord`, or `PoisonMessage`.

    Header names are matched case-insensitively. If `expected_type` is given, a record
    of another `ce_type` is poison too.
    """
    value = record.value
    if value is None:
        raise PoisonMessage("record has no value")
    if len(value) > MAX_VALUE_BYTES:
        raise PoisonMessage(f"value exceeds {MAX_VALUE_BYTES} bytes")
    attributes = _header_attributes(record.headers or ())
    for name in _REQUIRED:
        if name not in attributes:
            raise PoisonMessage(f"missing header {name}")
    if attributes[H_SPECVERSION] != SPECVERSION:
        raise PoisonMessage(f"unsupported {H_SPECVERSION} (expected {SPECVERSION})")
    if expected_type is not None and attributes[H_TYPE] != expected_type:
        raise PoisonMessage(f"unexpected {H_TYPE} (expected {expected_type})")
    content_type = attributes.get(H_CONTENT_TYPE)
    if content_type is not None and not _is_json(content_type):
        raise PoisonMessage(f"unsupported {H_CONTENT_TYPE} (expected {CONTENT_TYPE})")
    traceparent, tracestate = _trace_context(
        attributes.get(H_TRACEPARENT), attributes.get(H_TRACESTATE)
    )
    return InboundEvent(
        source=attributes[H_SOURCE],
        id=attributes[H_ID],
        type=attributes[H_TYPE],
        time=_time(attributes.get(H_TIME)),
        subject=attributes.get(H_SUBJECT),
        traceparent=traceparent,
        tracestate=tracestate,
        data=value,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
    )


def _header_attributes(headers: Iterable[tuple[str, bytes | None]]) -> dict[str, str]:
    seen: dict[str, str] = {}
    ambiguous_trace: set[str] = set()
    for raw_name, raw_value in headers:
        name = raw_name.lower()
        if name not in _ENVELOPE:
            continue  # other headers (ours or a platform's) do not concern the envelope
        if name in _TRACE:
            # W3C Trace Context: an unreadable or ambiguous context is dropped, never a
            # reason to dead-letter a payment request.
            trace_text = _utf8(raw_value)
            if name in seen or trace_text is None:
                ambiguous_trace.add(name)
            else:
                seen[name] = trace_text
            continue
        if raw_value is None:
            raise PoisonMessage(f"header {name} has no value")
        text = _utf8(raw_value)
        if text is None:
            raise PoisonMessage(f"header {name} is not UTF-8")
        if name in seen:
            raise PoisonMessage(f"duplicated header {name}")
        if not text:
            raise PoisonMessage(f"empty header {name}")
        # Counted in bytes: ce_source + ce_id key the inbox's unique index, whose entries
        # PostgreSQL caps at ~2.7 KB; 1 KiB each keeps the pair well under it.
        if len(raw_value) > MAX_ATTRIBUTE_BYTES:
            raise PoisonMessage(f"header {name} longer than {MAX_ATTRIBUTE_BYTES} bytes")
        # (Printable ASCII, the usual header, has no control character: no regex needed.)
        if not (text.isascii() and text.isprintable()) and _CONTROL.search(text):
            # CloudEvents 1.0 String: control characters MUST NOT be used (and PostgreSQL
            # text, where the inbox keeps ce_source and ce_id, cannot hold a NUL at all).
            raise PoisonMessage(f"header {name} contains a control character")
        seen[name] = text
    for name in ambiguous_trace:
        seen.pop(name, None)
    return seen


def _utf8(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _is_json(content_type: str) -> bool:
    media_type, *parameters = (part.strip().lower() for part in content_type.split(";"))
    if media_type != CONTENT_TYPE:
        return False
    for parameter in parameters:
        key, _, val = parameter.partition("=")
        if key.strip() == "charset" and val.strip().strip('"') not in ("utf-8", "utf8"):
            return False
    return True


def _time(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return msgspec.convert(text, _AwareDatetime)
    except msgspec.ValidationError:
        raise PoisonMessage(f"{H_TIME} is not an RFC 3339 timestamp") from None


def format_sequence(version: int) -> str:
    """`ce_sequence` of the event at `version` of its stream: decimal, zero-padded."""
    return f"{version:0{SEQUENCE_DIGITS}d}"


def parse_sequence(text: str) -> int:
    """The version a `ce_sequence` names, zero-padded or not (earlier releases); ValueError
    for anything but ASCII decimal digits."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{H_SEQUENCE} is not a decimal number")
    return int(text)


def _trace_context(
    traceparent: str | None, tracestate: str | None
) -> tuple[str | None, str | None]:
    # An invalid context is ignored (W3C Trace Context), never a reason to dead-letter a
    # payment request; tracestate means nothing without a valid traceparent.
    if traceparent is None:
        return None, None
    match = _TRACEPARENT.fullmatch(traceparent)
    if (
        match is None
        or match.group(1) == "ff"
        or set(match.group(2)) == {"0"}
        or set(match.group(3)) == {"0"}
    ):
        return None, None
    if tracestate is not None and (
        len(tracestate) > MAX_TRACESTATE_CHARS or not _TRACESTATE.fullmatch(tracestate)
    ):
        tracestate = None
    return traceparent, tracestate


_request_decoder = msgspec.json.Decoder(RequestPaymentMessage, strict=True)
_refund_decoder = msgspec.json.Decoder(RefundPaymentMessage, strict=True)
_initiated_decoder = msgspec.json.Decoder(PaymentInitiatedMessage, strict=True)


def decode_request(data: bytes) -> RequestPaymentMessage:
    """`saga.request_payment` data, strictly typed, or `PoisonMessage`."""
    return _decode(_request_decoder, data, "saga.request_payment")


def decode_refund(data: bytes) -> RefundPaymentMessage:
    """`saga.refund_payment` data, strictly typed, or `PoisonMessage`."""
    return _decode(_refund_decoder, data, "saga.refund_payment")


def decode_initiated(data: bytes) -> uuid.UUID:
    """The payment id of `payment.initiated` data, or `PoisonMessage`."""
    message = _decode(_initiated_decoder, data, "payment.initiated")
    try:
        return uuid.UUID(message.payment_id)
    except ValueError:
        raise PoisonMessage("payment_id is not a UUID") from None


def _decode(decoder: msgspec.json.Decoder[_T], data: bytes, what: str) -> _T:
    if len(data) > MAX_VALUE_BYTES:
        raise PoisonMessage(f"value exceeds {MAX_VALUE_BYTES} bytes")
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        detail = str(exc)
        if _SAFE_VALIDATION.fullmatch(detail) is None:
            detail = "invalid field value"
        raise PoisonMessage(f"{what} data: {detail}") from None
    except (msgspec.DecodeError, UnicodeDecodeError):
        # msgspec raises UnicodeDecodeError for invalid UTF-8 inside a JSON string.
        raise PoisonMessage(f"{what} data is not valid UTF-8 JSON") from None
    except RecursionError:
        # Deep nesting fits easily in 64 KiB; msgspec gives up instead of overflowing.
        raise PoisonMessage(f"{what} data nests too deeply") from None


def encode_outbound(
    msg: OutboundMessage, *, source: str, topic_for: Mapping[str, str]
) -> EncodedRecord:
    """The Kafka record of an outbox message: topic by type, key, JSON data and CE headers.

    Deterministic: re-publishing the same outbox row yields the same `ce_id`.
    Raises `KeyError` if `topic_for` has no topic for the message's type.
    """
    headers: list[tuple[str, bytes]] = [
        (H_SPECVERSION, SPECVERSION.encode()),
        (H_ID, str(msg.event_id).encode()),
        (H_SOURCE, source.encode()),
        (H_TYPE, msg.type.encode()),
        (H_TIME, format_time(msg.time).encode()),
        (H_CONTENT_TYPE, CONTENT_TYPE.encode()),
        (H_DATASCHEMA, dataschema_uri(msg.type, msg.schema_version).encode()),
    ]
    if msg.subject is not None:
        headers.append((H_SUBJECT, msg.subject.encode()))
    if msg.sequence is not None:
        headers.append((H_SEQUENCE, format_sequence(msg.sequence).encode()))
    if msg.trace.traceparent is not None:
        headers.append((H_TRACEPARENT, msg.trace.traceparent.encode()))
        if msg.trace.tracestate is not None:
            headers.append((H_TRACESTATE, msg.trace.tracestate.encode()))
    return EncodedRecord(
        topic=topic_for[msg.type], key=msg.key.encode(), value=msg.data, headers=headers
    )


def format_time(at: datetime) -> str:
    """RFC 3339 in UTC with a `Z` suffix (a naive time is taken as UTC)."""
    # A naive time is a bug upstream, but raising here would wedge the outbox relay on
    # one row forever; the stores only hand out UTC anyway.
    utc = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return utc.isoformat().replace("+00:00", "Z")
