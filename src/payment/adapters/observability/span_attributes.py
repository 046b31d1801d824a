"""Span names and attribute names, the service's own and OpenTelemetry's, in one place.

Messaging spans follow the OpenTelemetry semantic conventions for messaging and Kafka as
they are spelled today: a PRODUCER span `send {topic}` and a CONSUMER span
`process {topic}`, each with `messaging.operation.name` and `messaging.operation.type`,
`messaging.destination.name`, `messaging.destination.partition.id`,
`messaging.kafka.offset` and `messaging.consumer.group.name`. No token, key or card data
is ever an attribute value (untrusted text goes through span_values.py first).
"""

from __future__ import annotations

from typing import Final

# -- the service's attributes -------------------------------------------------------------
ATTR_PAYMENT_ID: Final = "payment.id"
ATTR_BOOKING_ID: Final = "payment.booking_id"
ATTR_REFUND_ID: Final = "payment.refund_id"
ATTR_PROCESSOR: Final = "payment.processor"
ATTR_OPERATION: Final = "payment.operation"
ATTR_OUTCOME: Final = "payment.outcome"
ATTR_DECLINE_CODE: Final = "payment.decline_code"
ATTR_ERROR_TYPE: Final = "error.type"

# -- CloudEvents (the OpenTelemetry CloudEvents conventions) --------------------------------
ATTR_EVENT_ID: Final = "cloudevents.event_id"
ATTR_EVENT_SOURCE: Final = "cloudevents.event_source"
ATTR_EVENT_TYPE: Final = "cloudevents.event_type"

# -- messaging (the OpenTelemetry messaging and Kafka conventions) --------------------------
MESSAGING_SYSTEM: Final = "messaging.system"
MESSAGING_OPERATION_NAME: Final = "messaging.operation.name"
MESSAGING_OPERATION_TYPE: Final = "messaging.operation.type"
MESSAGING_DESTINATION: Final = "messaging.destination.name"
MESSAGING_PARTITION: Final = "messaging.destination.partition.id"
MESSAGING_MESSAGE_ID: Final = "messaging.message.id"
MESSAGING_KAFKA_OFFSET: Final = "messaging.kafka.offset"
MESSAGING_CONSUMER_GROUP: Final = "messaging.consumer.group.name"

KAFKA: Final = "kafka"
SEND: Final = "send"
PROCESS: Final = "process"


def send_span_name(topic: str) -> str:
    """The PRODUCER span's name: `send {topic}`."""
    return f"{SEND} {topic}"


def process_span_name(topic: str) -> str:
    """The CONSUMER span's name: `process {topic}`."""
    return f"{PROCESS} {topic}"


def send_attributes(topic: str, message_id: str) -> dict[str, str | int]:
    """The messaging attributes of a PRODUCER span publishing one message to `topic`."""
    return {
        MESSAGING_SYSTEM: KAFKA,
        MESSAGING_OPERATION_NAME: SEND,
        MESSAGING_OPERATION_TYPE: SEND,
        MESSAGING_DESTINATION: topic,
        MESSAGING_MESSAGE_ID: message_id,
    }


def process_attributes(
    topic: str, partition: int, offset: int, consumer_group: str | None
) -> dict[str, str | int]:
    """The messaging attributes of a CONSUMER span processing one record."""
    attributes: dict[str, str | int] = {
        MESSAGING_SYSTEM: KAFKA,
        MESSAGING_OPERATION_NAME: PROCESS,
        MESSAGING_OPERATION_TYPE: PROCESS,
        MESSAGING_DESTINATION: topic,
        MESSAGING_PARTITION: str(partition),
        MESSAGING_KAFKA_OFFSET: offset,
    }
    if consumer_group is not None:
        attributes[MESSAGING_CONSUMER_GROUP] = consumer_group
    return attributes
