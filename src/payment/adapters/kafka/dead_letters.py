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
# Present when the dead letter could not keep what the record carried: the size in bytes
# of the value, the original headers or the key it left out.
DLQ_VALUE_DROPPED: Final = "dlq_value_dropped"
DLQ_HEADERS_DROPPED: Final = "dlq_headers_dropped"
DLQ_KEY_DROPPED: Final = "dlq_key_dropped"
# Too large for the producer's or the broker's limit: the same bytes will never fit.
_TOO_LARGE: Final = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)
# Every header this module adds starts so; a re-parked record sheds the old ones.
DLQ_PREFIX: Final = "dlq_"
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

        A record too large to park as it is (past the producer's `max_request_size` or
        the broker's message limit, once the `dlq_*` headers are added) is parked without
        its largest part (value, original headers or key), then the next largest, each
        drop said in `dlq_value_dropped` / `dlq_headers_dropped` / `dlq_key_dropped` (the
        size left out): retrying the same bytes would block the partition forever
        (contract 4.5: the partition keeps moving).
        """
        # A record re-driven from the dead-letter topic that fails again gets fresh dlq_*
        # headers, not a second, contradicting set.
        original: list[tuple[str, bytes | None]] = [
            (name, value)
            for name, value in (record.headers or ())
            if not name.lower().startswith(DLQ_PREFIX)
        ]
        dlq: list[tuple[str, bytes | None]] = [
            (DLQ_REASON, _bounded(reason).encode()),
            (DLQ_ORIGINAL_TOPIC, record.topic.encode()),
            (DLQ_ORIGINAL_PARTITION, str(record.partition).encode()),
            (DLQ_ORIGINAL_OFFSET, str(record.offset).encode()),
            (DLQ_CONSUMER_GROUP, self._consumer_group.encode()),
        ]
        key, value = record.key, record.value
        dropped: list[tuple[str, bytes | None]] = []
        sizes = {
            DLQ_VALUE_DROPPED: None if value is None else len(value),
            DLQ_HEADERS_DROPPED: sum(len(n) + len(v or b"") for n, v in original) or None,
            DLQ_KEY_DROPPED: None if key is None else len(key),
        }
        while True:
            try:
                await self._producer.send_and_wait(
                    self._topic, value=value, key=key, headers=[*original, *dlq, *dropped]
                )
                self.published += 1
                return
            except _TOO_LARGE:
                left = {name: size for name, size in sizes.items() if size is not None}
                if not left:
                    raise
            # The largest part first: the least is lost.
            part = max(left, key=lambda name: left[name])
            size = sizes.pop(part)
            dropped.append((part, str(size).encode()))
            if part == DLQ_VALUE_DROPPED:
                value = None
            elif part == DLQ_HEADERS_DROPPED:
                original = []
            else:
                key = None
            log.warning(
                "dead letter of %s[%d]@%d too large: leaving out %s bytes (%s)",
                record.topic,
                record.partition,
                record.offset,
                size,
                part,
            )


def _bounded(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "…"
