"""Queueing a relay round: one batch per partition, an acknowledgement per record."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, ProducerClosed, RecordTooLargeError

from payment.adapters.kafka.cloudevents import EncodedRecord
from payment.adapters.kafka.partition_batches import BatchingProducer, queue_records
from payment.adapters.kafka.partitioner import key_partitioner
from support.batching_producer import PARTITIONS, BatchingFake
from support.record_senders import FakeRecordQueue, Outgoing


def record(key: str, topic: str = "payments.initiated") -> EncodedRecord:
    return EncodedRecord(topic, key.encode(), b'{"k":"' + key.encode() + b'"}', [("ce_id", b"1")])


def test_the_fake_is_a_batching_producer() -> None:
    assert isinstance(BatchingFake(), BatchingProducer)
    assert not isinstance(FakeRecordQueue(), BatchingProducer)


async def test_the_records_of_a_partition_share_one_batch_and_its_acknowledgement() -> None:
    producer = BatchingFake()
    records = [record(f"pay-{n}") for n in range(40)]
    acks = await queue_records(producer, records)
    assert len(acks) == len(records)
    # One batch per partition the keys fall on, each holding exactly that partition's keys.
    partitions = sorted(PARTITIONS["payments.initiated"])
    expected: dict[int, list[bytes]] = {}
    for r in records:
        expected.setdefault(key_partitioner(r.key, partitions, partitions), []).append(r.key)
    assert {p: [k for k, _, _ in b.records] for _, p, b, _ in producer.batches} == expected
    assert producer.one_by_one == []
    # A record is acknowledged when its batch is, with its own value and headers.
    batch_of = {k: ack for _, _, b, ack in producer.batches for k, _, _ in b.records}
    assert all(ack is batch_of[r.key] for r, ack in zip(records, acks, strict=True))
    assert not any(ack.done() for ack in acks)
    stored = {k: (v, h) for _, _, b, _ in producer.batches for k, v, h in b.records}
    assert all(stored[r.key] == (r.value, r.headers) for r in records)


async def test_a_full_batch_goes_and_the_rest_follows_in_another() -> None:
    producer = BatchingFake(capacity=3)
    records = [record(f"pay-{n}", "payments.completed") for n in range(30)]
    acks = await queue_records(producer, records)
    per_partition: dict[int, int] = {}
    for _, partition, batch, _ in producer.batches:
        assert 1 <= len(batch.records) <= 3
        per_partition[partition] = per_partition.get(partition, 0) + len(batch.records)
    assert sum(per_partition.values()) == len(records)
    producer.ack_all()
    await asyncio.wait(acks)
    assert all(ack.exception() is None for ack in acks)


async def test_records_of_different_topics_go_in_batches_of_their_own() -> None:
    producer = BatchingFake()
    await queue_records(producer, [record("a"), record("b", "payments.completed"), record("c")])
    topics = {topic for topic, *_ in producer.batches}
    assert topics == {"payments.initiated", "payments.completed"}
    for topic, partition, batch, _ in producer.batches:
        every = sorted(PARTITIONS[topic])
        assert all(key_partitioner(k, every, every) == partition for k, _, _ in batch.records)


async def test_a_topic_without_metadata_fails_its_own_records_only() -> None:
    producer = BatchingFake()
    producer.missing_topics.add("payments.completed")
    records = [record("a"), record("b", "payments.completed"), record("c")]
    acks = await queue_records(producer, records)
    assert isinstance(acks[1].exception(), KafkaTimeoutError)
    assert not acks[0].done() and not acks[2].done()
    producer.ack_all()
    await asyncio.wait([acks[0], acks[2]])


async def test_a_batch_refused_before_queueing_is_the_error_of_its_records() -> None:
    producer = BatchingFake()
    producer.refuse_batches = True
    acks = await queue_records(producer, [record("a"), record("b")])
    assert all(isinstance(ack.exception(), ProducerClosed) for ack in acks)


async def test_unbatched_records_go_one_send_at_a_time() -> None:
    producer = BatchingFake()
    acks = await queue_records(producer, [record("a"), record("b")], batched=False)
    await asyncio.wait(acks)
    assert [r.key for r in producer.one_by_one] == [b"a", b"b"]
    assert producer.batches == []


async def test_a_producer_without_batches_gets_one_send_per_record() -> None:
    class OneByOne(FakeRecordQueue):
        def __init__(self) -> None:
            self.sent: list[Outgoing] = []

        async def deliver(self, record: Outgoing) -> object:
            self.sent.append(record)
            return None

        def queue(self, record: Outgoing) -> None:
            if record.key == b"refused":
                raise KafkaTimeoutError()

    producer = OneByOne()
    acks = await queue_records(producer, [record("a"), record("refused"), record("b")])
    await asyncio.wait(acks)
    assert [r.key for r in producer.sent] == [b"a", b"b"]
    assert isinstance(acks[1].exception(), KafkaTimeoutError)


@pytest.mark.parametrize("count", [0, 1])
async def test_nothing_or_one_record(count: int) -> None:
    producer = BatchingFake()
    acks = await queue_records(producer, [record("a")] * count)
    assert len(acks) == count
    assert len(producer.batches) == count


async def test_a_batch_the_producer_holds_past_the_deadline_fails_its_records_only() -> None:
    producer = BatchingFake()
    records = [record(f"pay-{n}") for n in range(30)]
    every = sorted(PARTITIONS["payments.initiated"])
    partition_of = [key_partitioner(r.key, every, every) for r in records]
    producer.stuck = {partition_of[0]}
    loop = asyncio.get_running_loop()
    acks = await queue_records(producer, records, deadline=loop.time() + 0.05)
    for partition, ack in zip(partition_of, acks, strict=True):
        if partition in producer.stuck:
            assert isinstance(ack.exception(), TimeoutError)
        else:
            assert not ack.done()  # queued, awaiting the broker
    # Nothing of the held batch was queued.
    assert all(p not in producer.stuck for _, p, _, _ in producer.batches)


async def test_a_send_held_past_the_deadline_fails_that_record() -> None:
    class Held(FakeRecordQueue):
        async def deliver(self, record: Outgoing) -> object:
            return None

        async def send(self, *args: Any, **kwargs: Any) -> asyncio.Future[object]:
            if kwargs["key"] == b"held":
                await asyncio.Event().wait()
            return await super().send(*args, **kwargs)

    loop = asyncio.get_running_loop()
    acks = await queue_records(
        Held(), [record("held"), record("b")], batched=False, deadline=loop.time() + 0.05
    )
    assert isinstance(acks[0].exception(), TimeoutError)
    await asyncio.wait([acks[1]])
    assert acks[1].exception() is None


async def test_a_record_no_batch_takes_fails_and_is_never_acknowledged() -> None:
    producer = BatchingFake(capacity=0)
    acks = await queue_records(producer, [record("a"), record("b", "payments.completed")])
    assert producer.batches == []  # nothing queued, not even an empty batch
    assert all(isinstance(ack.exception(), RecordTooLargeError) for ack in acks)
