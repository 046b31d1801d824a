"""Dead letters: poison records parked on the dead-letter topic, original bytes intact."""

from __future__ import annotations

from typing import Final

from payment.adapters.kafka.cloudevents import ConsumedRecord
from payment.adapters.kafka.producer import RecordSender

DLQ_REASON: Final = "dlq_reason"
DLQ_ORIGINAL_TOPIC: Final = "dlq_original_topic"
DLQ_ORIGINAL_PARTITION: Final = "dlq_original_partition"
DLQ_ORIGINAL_OFFSET: Final = "dlq_original_offset"
DLQ_CONSUMER_GROUP: Final = "dlq_consumer_group"
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
        """
        # A record re-driven from the dead-letter topic that fails again gets fresh dlq_*
        # headers, not a second, contradicting set.
        headers: list[tuple[str, bytes | None]] = [
            (name, value)
            for name, value in (record.headers or ())
            if not name.startswith(_DLQ_PREFIX)
        ]
        headers += [
            (DLQ_REASON, _bounded(reason).encode()),
            (DLQ_ORIGINAL_TOPIC, record.topic.encode()),
            (DLQ_ORIGINAL_PARTITION, str(record.partition).encode()),
            (DLQ_ORIGINAL_OFFSET, str(record.offset).encode()),
            (DLQ_CONSUMER_GROUP, self._consumer_group.encode()),
        ]
        await self._producer.send_and_wait(
            self._topic, value=record.value, key=record.key, headers=headers
        )
        self.published += 1


def _bounded(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "…"
