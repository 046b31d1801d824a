"""Dead letters: poison records parked on the dead-letter topic, original bytes intact
but for card numbers, which are masked."""

from __future__ import annotations

import logging
import re
from typing import Final

from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError

from payment.application.ports import ConsumedRecord, RecordSender
from payment.application.validation import mask_card_numbers

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
# Present when card numbers were masked (contract section 3: never published): the parts
# of the dead letter whose card numbers were masked, comma-separated, in this order (a
# part left out for its size is not named: the dead letter does not carry it).
DLQ_CARD_NUMBERS_MASKED: Final = "dlq_card_numbers_masked"
MASKED_VALUE: Final = "value"
MASKED_KEY: Final = "key"
MASKED_HEADERS: Final = "headers"
_DROPPED_PART: Final = {
    MASKED_VALUE: DLQ_VALUE_DROPPED,
    MASKED_KEY: DLQ_KEY_DROPPED,
    MASKED_HEADERS: DLQ_HEADERS_DROPPED,
}
# Every text `mask_card_numbers` changes holds such a run (ASCII digits, spaces and
# dashes, 13 characters at least) or a JSON escape of a digit, space or dash: one scan of
# the raw bytes clears nearly every record without decoding or copying it.
_CARD_CANDIDATE: Final = re.compile(rb"[0-9][0-9 -]{11,}[0-9]|\\u00(?:3[0-9]|20|2[dD])")
# Too large for the producer's or the broker's limit: the same bytes will never fit.
_TOO_LARGE: Final = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)
# Every header this module adds starts so; a re-parked record sheds the old ones.
DLQ_PREFIX: Final = "dlq_"
MAX_REASON_CHARS: Final = 500


class KafkaDeadLetterPublisher:
    """Publishes a record that cannot be processed to the dead-letter topic (contract 4.5).

    The dead letter carries the original key, value and headers (so the CloudEvents
    `ce_type`, if any, stays) plus the `dlq_*` headers saying why and where it came from.
    A card number in any of them (contract section 3: never stored, logged or published)
    is replaced by `[REDACTED CARD]`, every other byte kept, and `dlq_card_numbers_masked`
    names the parts that changed (`value`, `key`, `headers`): such a dead letter is not
    the original record, and the redrive tool refuses it.
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
        record's size of that part): retrying the same bytes would block the partition forever
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
        dropped: list[tuple[str, bytes | None]] = []
        # The sizes of the record's own parts, as an operator would look for them.
        sizes = {
            DLQ_VALUE_DROPPED: None if record.value is None else len(record.value),
            DLQ_HEADERS_DROPPED: sum(len(n) + len(v or b"") for n, v in original) or None,
            DLQ_KEY_DROPPED: None if record.key is None else len(record.key),
        }
        key, value, original, masked = mask_record(record.key, record.value, original)
        while True:
            said = [(DLQ_CARD_NUMBERS_MASKED, ",".join(masked).encode())] if masked else []
            try:
                await self._producer.send_and_wait(
                    self._topic,
                    # aiokafka refuses a record with neither: an empty value stands in.
                    value=b"" if value is None and key is None else value,
                    key=key,
                    headers=[*original, *dlq, *said, *dropped],
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
            # Only what the dead letter still carries is said to be masked.
            masked = [name for name in masked if _DROPPED_PART[name] != part]
            log.warning(
                "dead letter of %s[%d]@%d too large: leaving out %s bytes (%s)",
                record.topic,
                record.partition,
                record.offset,
                size,
                part,
            )


def mask_record(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes | None]]
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]], list[str]]:
    """Key, value and header values with card numbers masked, and the parts that changed
    (`value`, `key`, `headers`, in this order; empty when nothing did).

    Everything but the masked runs stays byte for byte, invalid UTF-8 included: the bytes
    are decoded with `surrogateescape`, which encodes back to exactly the same bytes.
    Header names are the sender's field names, not data, and are kept.
    """
    masked: list[str] = []
    new_value = _masked(value)
    if new_value is not None:
        value = new_value
        masked.append(MASKED_VALUE)
    new_key = _masked(key)
    if new_key is not None:
        key = new_key
        masked.append(MASKED_KEY)
    changed = False
    kept: list[tuple[str, bytes | None]] = []
    for name, raw in headers:
        new = _masked(raw)
        changed = changed or new is not None
        kept.append((name, raw if new is None else new))
    if changed:
        headers = kept
        masked.append(MASKED_HEADERS)
    return key, value, headers, masked


def _masked(raw: bytes | None) -> bytes | None:
    """`raw` with its card numbers masked, or None if it holds none."""
    if raw is None or _CARD_CANDIDATE.search(raw) is None:
        return None
    text = raw.decode("utf-8", "surrogateescape")
    masked = mask_card_numbers(text)
    return None if masked == text else masked.encode("utf-8", "surrogateescape")


def _bounded(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "…"
