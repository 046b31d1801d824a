"""Where a partition's reading starts when its committed offset is missing or gone.

The consumer runs with `auto_offset_reset="none"`, so neither case is silent:

- no committed offset (a new group, a new partition): read from the beginning, as
  `earliest` would, with an INFO line;
- a committed offset outside the log: records were deleted before this group handled
  them (retention shorter than the lag, `delete_records`), or the topic was recreated.
  Reading goes on from the log's start — what was deleted is gone from the broker and
  cannot be handled by anyone — with an ERROR line naming the partition and the range,
  and `payment_consumer_offset_resets_total` / `payment_consumer_records_skipped_total`
  for alerts. A recreated topic is re-read whole; the inbox drops what was handled.
"""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer, TopicPartition

from payment.adapters.observability.metrics import Metrics

log = logging.getLogger(__name__)


async def start_from_beginning(
    consumer: AIOKafkaConsumer, partition: TopicPartition, metrics: Metrics
) -> None:
    """A partition this group never committed an offset for: read it from its start."""
    if partition not in consumer.assignment():
        return  # revoked meanwhile: its new owner decides
    await consumer.seek_to_beginning(partition)
    metrics.consumer_offset_resets.add(1, {"topic": partition.topic, "reason": "no_offset"})
    log.info(
        "consumer: no committed offset for %s[%d]: reading it from the beginning",
        partition.topic,
        partition.partition,
    )


async def recover_out_of_range(
    consumer: AIOKafkaConsumer, partition: TopicPartition, offset: int, metrics: Metrics
) -> None:
    """`offset` is outside the partition's log: go on from its start, loudly."""
    if partition not in consumer.assignment():
        return
    first = (await consumer.beginning_offsets([partition]))[partition]
    end = (await consumer.end_offsets([partition]))[partition]
    await consumer.seek_to_beginning(partition)
    labels = {"topic": partition.topic, "reason": "out_of_range"}
    metrics.consumer_offset_resets.add(1, labels)
    if offset < first:
        metrics.consumer_records_skipped.add(first - offset, {"topic": partition.topic})
        log.error(
            "consumer: %s[%d] offset %d is no longer in the log (it holds %d..%d): records "
            "%d..%d were deleted before this group handled them and are lost; going on from "
            "%d. Check the topic's retention against the consumer lag.",
            partition.topic,
            partition.partition,
            offset,
            first,
            end,
            offset,
            first - 1,
            first,
        )
    else:
        log.error(
            "consumer: %s[%d] offset %d is past the end of the log (%d): the topic was "
            "recreated or truncated; re-reading it from %d (the inbox drops what was "
            "already handled)",
            partition.topic,
            partition.partition,
            offset,
            end,
            first,
        )
