"""Dead letters: poison records parked on the dead-letter topic, original bytes intact."""

from __future__ import annotations

import logging
from typing import Final

from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError

from payment.adapters.kafka.cloudevents import ConsumedRecord
from payment.adapters.kafka.producer import RecordSender

log = logging.getLogger(__name__)

DLQ_REASON: Final = "dlq_reason"
DLQ_ORIGINAL_TOPIC: Final = "dlq_original_topic"
DLQ_ORIGINAL_PARTITION: Final = "dlq_original_partition"
DLQ_ORIGINAL_OFFSET: Final = "dlq_original_offset"
DLQ_CONSUMER_GROUP: Final = "dlq_consumer_group"
# Present when the dead letter could not keep what the record carried: the original
# size in bytes of the value (`dlq_value_dropped`) or of the headers (`dlq_headers_dropped`).
DLQ_VALUE_DROPPED: Final = "dlq_value_dropped"
DLQ_HEADERS_DROPPED: Final = "dlq_headers_dropped"
# Too large for the producer's or the broker's limit: the same bytes will never fit.
_TOO_LARGE: Final = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)
_DLQ_PREFIX: Final = "dlq_"
MAX_REASON_CHARS: Final = 500


class KafkaDeadLetterPublisher:
    """Publishes a record that cannot be processed to the dead-letter topic (contract 4.5).

    The dead letter carries the original key, value and headers (so the CloudEvents
    `ce_type`, if any, stays) plus the `dlq_*` headers saying why and where it came from.
    """

    def __init__(self, producer: RecordSender, topic: str, consumer_group: str) -> None:
        self._producer = producer
        self._topic = topic
        self._consumer_group = consumer_group
        self.published = 0

    async def publish(self, record: ConsumedRecord, reason: str) -> None:
        """Send the dead letter and return only once the broker acknowledged it.

        The caller moves its offset past the record only after this returns; a broker
        error propagates (aiokafka's `KafkaError`) so it can retry.

        A record too large to park as it is (a value past the producer's
        `max_request_size` or the broker's message limit, once the `dlq_*` headers are
        added) is parked without its value, then also without its original headers,
        saying so in `dlq_value_dropped` / `dlq_headers_dropped`: retrying the same bytes
        would block the partition forever (contract 4.5: the partition keeps moving).
        """
        # A record re-driven from the dead-letter topic that fails again gets fresh dlq_*
        # headers, not a second, contradicting set.
        original: list[tuple[str, bytes | None]] = [
            (name, value)
            for name, value in (record.headers or ())
            if not name.lower().startswith(_DLQ_PREFIX)
        ]
        dlq: list[tuple[str, bytes | None]] = [
            (DLQ_REASON, _bounded(reason).encode()),
            (DLQ_ORIGINAL_TOPIC, record.topic.encode()),
            (DLQ_ORIGINAL_PARTITION, str(record.partition).encode()),
            (DLQ_ORIGINAL_OFFSET, str(record.offset).encode()),
            (DLQ_CONSUMER_GROUP, self._consumer_group.encode()),
        ]
        value = record.value
        try:
            await self._send(record, value, original + dlq)
            return
        except _TOO_LARGE:
            if value is None:
                raise
        value_size = str(len(value)).encode()
        log.warning(
            "dead letter of %s[%d]@%d too large to keep its %d-byte value: dropping the value",
            record.topic,
            record.partition,
            record.offset,
            len(value),
        )
        try:
            await self._send(record, None, [*original, *dlq, (DLQ_VALUE_DROPPED, value_size)])
            return
        except _TOO_LARGE:
            pass
        headers_size = sum(len(n) + len(v or b"") for n, v in original)
        log.warning(
            "dead letter of %s[%d]@%d still too large: dropping its %d bytes of headers too",
            record.topic,
            record.partition,
            record.offset,
            headers_size,
        )
        await self._send(
            record,
            None,
            [
                *dlq,
                (DLQ_VALUE_DROPPED, value_size),
                (DLQ_HEADERS_DROPPED, str(headers_size).encode()),
            ],
        )

    async def _send(
        self, record: ConsumedRecord, value: bytes | None, headers: list[tuple[str, bytes | None]]
    ) -> None:
        await self._producer.send_and_wait(
            self._topic, value=value, key=record.key, headers=headers
        )
        self.published += 1


def _bounded(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "…"
