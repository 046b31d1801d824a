"""Record to command: which handler a consumed record goes to, and the command it becomes.

Written once for both paths: a record handled alone and a record handled in a batch
decode and map the same way (the batch path only stamps its own trace on each command).
"""

from __future__ import annotations

import enum
import uuid

import msgspec
from aiokafka.structs import ConsumerRecord
from opentelemetry.trace import Span

from payment.adapters.kafka.cloudevents import (
    InboundEvent,
    PoisonMessage,
    decode_initiated,
    decode_record,
    decode_refund,
    decode_request,
)
from payment.adapters.kafka.consumer.undecodable import UndecodableRecord
from payment.adapters.observability.span_values import untrusted_attribute
from payment.adapters.observability.telemetry import trace_headers_of
from payment.application.commands import (
    ExecutePayment,
    InboundRef,
    RefundPayment,
    RequestPayment,
    TraceHeaders,
)
from payment.application.messages import PAYMENT_INITIATED, REFUND_PAYMENT, REQUEST_PAYMENT


class Route(enum.Enum):
    """The handler a record goes to, by its topic."""

    REQUEST = REQUEST_PAYMENT
    INITIATED = PAYMENT_INITIATED
    REFUND = REFUND_PAYMENT


class Topics:
    """The consumed topics and the route of each."""

    def __init__(self, request: str, initiated: str, refund: str | None) -> None:
        self.request = request
        self.initiated = initiated
        self.refund = refund

    def all(self) -> list[str]:
        return [self.request, self.initiated, *([self.refund] if self.refund else [])]

    def route(self, topic: str) -> Route:
        """The route of `topic`, or `PoisonMessage` for a topic not consumed here."""
        if topic == self.request:
            return Route.REQUEST
        if topic == self.initiated:
            return Route.INITIATED
        if self.refund is not None and topic == self.refund:
            return Route.REFUND
        raise PoisonMessage(f"unexpected topic {topic}")


def decode(record: ConsumerRecord[bytes, bytes], route: Route) -> InboundEvent:
    """The record's envelope, checked against its route's `ce_type`, or `PoisonMessage`.

    A record the client library could not decode (see `undecodable.py`) is poison with
    the reason found when it was read.
    """
    if isinstance(record, UndecodableRecord):
        raise PoisonMessage(record.reason)
    event = decode_record(record)
    if event.type != route.value:
        raise PoisonMessage(f"unexpected ce_type on {record.topic}")
    return event


def received_trace(event: InboundEvent) -> TraceHeaders:
    return TraceHeaders(traceparent=event.traceparent, tracestate=event.tracestate)


def request_command(event: InboundEvent, trace_headers: TraceHeaders) -> RequestPayment:
    """The request's command, its fields the message's as received, or `PoisonMessage` if
    its body does not decode."""
    fields = msgspec.structs.asdict(decode_request(event.data))
    return RequestPayment(inbound=_inbound(event), trace=trace_headers, **fields)


def execute_command(event: InboundEvent, trace_headers: TraceHeaders) -> ExecutePayment:
    """The initiated event's command, or `PoisonMessage` if its body does not decode."""
    payment_id: uuid.UUID = decode_initiated(event.data)
    return ExecutePayment(inbound=_inbound(event), payment_id=payment_id, trace=trace_headers)


def refund_command(event: InboundEvent) -> RefundPayment:
    """The refund request's command, its fields the message's as received, or
    `PoisonMessage` if its body does not decode."""
    fields = msgspec.structs.asdict(decode_refund(event.data))
    return RefundPayment(inbound=_inbound(event), trace=received_trace(event), **fields)


def _inbound(event: InboundEvent) -> InboundRef:
    return InboundRef(source=event.source, message_id=event.id)


def tag_event(span: Span, event: InboundEvent) -> None:
    """The message's CloudEvents attributes on its span: the sender's, so bounded and masked.

    Worked out only for a span that records (masking costs more than a span that does not).
    """
    if not span.is_recording():
        return
    event_id = untrusted_attribute(event.id)
    span.set_attribute("messaging.message.id", event_id)
    span.set_attribute("cloudevents.event_id", event_id)
    span.set_attribute("cloudevents.event_source", untrusted_attribute(event.source))
    span.set_attribute("cloudevents.event_type", untrusted_attribute(event.type))


def trace_of(span: Span, event: InboundEvent) -> TraceHeaders:
    """The trace context outbound rows of this message carry: its CONSUMER span's.

    (The single-message path stamps rows with the span in force when they are written;
    a batch writes many messages' rows outside any one span, so each carries its own.)
    Without a valid span (tracing off), the sender's context as received.
    """
    return trace_headers_of(span) or received_trace(event)
