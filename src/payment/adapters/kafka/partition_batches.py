"""Queueing a relay round's records: one batch per partition where the producer takes them.

aiokafka's `send()` costs 18-23 µs of CPU per record (serialising, choosing the
partition, a future and an append in its accumulator); the same records appended to a
`create_batch()` builder and queued with `send_batch()` cost 3.5-6.4 µs
(`bench/producer.py`, docs/performance.md). The broker sees the same thing either way:
aiokafka packs what is queued for one partition into one record batch, so a record the
broker refuses fails its partition's batch-mates with `send()` too (the relay's `_alone`
keys handle that).

Each record keeps an acknowledgement of its own to await: its batch's. The records of a
round have distinct keys (the relay sends a key's next row only after this one's ack), so
the order between records of one batch does not matter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from aiokafka.errors import RecordTooLargeError

from payment.adapters.kafka.cloudevents import EncodedRecord
from payment.adapters.kafka.partitioner import key_partitioner
from payment.application.ports import RecordQueue

Ack = asyncio.Future[object]


@runtime_checkable
class BatchingProducer(Protocol):
    """What aiokafka's producer offers for whole batches (`AIOKafkaProducer`)."""

    def create_batch(self) -> Any:
        """An empty batch builder: `append(timestamp=, key=, value=, headers=)`, None when full."""
        ...

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> Ack:
        """Queue a built batch for one partition; its future resolves at the broker's ack."""
        ...

    async def partitions_for(self, topic: str) -> set[int]:
        """The topic's partitions, waiting for its metadata if need be."""
        ...


async def queue_records(
    producer: RecordQueue,
    records: Sequence[EncodedRecord],
    *,
    batched: bool = True,
    deadline: float | None = None,
) -> list[Ack]:
    """Queue `records`; each one's acknowledgement, in order.

    An error before queueing (no metadata for a topic, a closed producer) becomes the
    acknowledgement of the records it concerns, as `send()` raising does for one record.
    So does `deadline` (event loop time) passing while the producer makes a record wait:
    for a topic's metadata, or, with the broker away, for the batch queued before to go
    (aiokafka queues one batch per partition at a time). Nothing is queued for those.
    Not `batched`, or with a producer without `send_batch`, each record goes by `send()`
    (which also refuses a record over the producer's `max_request_size` before queueing).
    """
    if not batched or not isinstance(producer, BatchingProducer):
        return [await _send_one(producer, record, deadline) for record in records]
    acks: list[Ack | None] = [None] * len(records)
    by_topic: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_topic.setdefault(record.topic, []).append(i)
    for topic, indexes in by_topic.items():
        try:
            async with asyncio.timeout_at(deadline):
                partitions = sorted(await producer.partitions_for(topic))
        except Exception as exc:  # every record of the topic fails alike
            for i in indexes:
                acks[i] = _failed(exc)
            continue
        by_partition: dict[int, list[int]] = {}
        for i in indexes:
            partition = key_partitioner(records[i].key, partitions, partitions)
            by_partition.setdefault(partition, []).append(i)
        for partition, members in by_partition.items():
            for batch_members, ack in await _queue_partition(
                producer, records, topic, partition, members, deadline
            ):
                for i in batch_members:
                    acks[i] = ack
    return [ack for ack in acks if ack is not None]


async def _queue_partition(
    producer: BatchingProducer,
    records: Sequence[EncodedRecord],
    topic: str,
    partition: int,
    members: list[int],
    deadline: float | None,
) -> list[tuple[list[int], Ack]]:
    """The partition's records in as few batches as their size allows: (members, ack)."""
    queued: list[tuple[list[int], Ack]] = []
    batch = producer.create_batch()
    in_batch: list[int] = []
    for i in members:
        if not _append(batch, records[i]):
            if in_batch:  # full: queue it and go on in a new one
                queued.append(
                    (in_batch, await _send_batch(producer, batch, topic, partition, deadline))
                )
                batch, in_batch = producer.create_batch(), []
            # aiokafka's empty batch takes any record (the broker may refuse it, alone);
            # a record not in a batch must never get a batch's acknowledgement.
            if not _append(batch, records[i]):
                queued.append(([i], _failed(RecordTooLargeError("not taken by an empty batch"))))
                continue
        in_batch.append(i)
    if in_batch:
        queued.append((in_batch, await _send_batch(producer, batch, topic, partition, deadline)))
    return queued


def _append(batch: Any, record: EncodedRecord) -> bool:
    appended = batch.append(
        timestamp=None, key=record.key, value=record.value, headers=record.headers
    )
    return appended is not None


async def _send_batch(
    producer: BatchingProducer, batch: Any, topic: str, partition: int, deadline: float | None
) -> Ack:
    try:
        # Cancelled while it waits, aiokafka has queued nothing of the batch.
        async with asyncio.timeout_at(deadline):
            return await producer.send_batch(batch, topic, partition=partition)
    except Exception as exc:  # refused before queueing: the batch's ack is the error
        return _failed(exc)


async def _send_one(producer: RecordQueue, record: EncodedRecord, deadline: float | None) -> Ack:
    try:
        async with asyncio.timeout_at(deadline):
            return await producer.send(
                record.topic, value=record.value, key=record.key, headers=record.headers
            )
    except Exception as exc:  # refused before queueing: the record's ack is the error
        return _failed(exc)


def _failed(exc: BaseException) -> Ack:
    ack: Ack = asyncio.get_running_loop().create_future()
    ack.set_exception(exc)
    return ack


__all__ = ["BatchingProducer", "queue_records"]
