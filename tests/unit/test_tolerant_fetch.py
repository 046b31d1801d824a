"""`TolerantFetch` and `read_batches` on the paths the brokers cannot be made to take:
a salvage that fails half way, errors that are not about fetched bytes, a partition read
again from its start, and bytes after a batch's last record."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import TopicAuthorizationFailedError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import ConsumerRecord

from payment.adapters.kafka.consumer import UndecodableRecord
from payment.adapters.kafka.consumer.tolerant_fetch import TolerantFetch
from payment.adapters.kafka.consumer.undecodable import read_batches
from payment.application.retry import Backoff

A = TopicPartition("t", 0)
B = TopicPartition("t", 1)


def batch(base: int, count: int) -> bytearray:
    """A valid record batch of `count` records whose first offset is `base`."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for delta in range(count):
        builder.append(delta, timestamp=1, key=b"k", value=b"v%d" % delta, headers=[])
    data = bytearray(builder.build())
    struct.pack_into(">q", data, 0, base)
    return data


def resealed(data: bytearray) -> bytes:
    """`data` with its Length and CRC made to match its bytes again, as a broker stores it."""
    struct.pack_into(">i", data, 8, len(data) - 12)
    struct.pack_into(">I", data, 17, calc_crc32c(bytes(data[21:])))
    return bytes(data)


def record(tp: TopicPartition, offset: int) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(tp.topic, tp.partition, offset, 1, 0, b"k", b"v", None, 1, 1, ())


@dataclass
class Response:
    topics: list[tuple[str, list[tuple[int, int, int, bytes]]]]


@dataclass
class Client:
    """The consumer's client as `TolerantFetch` uses it: leaders, and one raw fetch."""

    raw: dict[TopicPartition, bytes | Exception]

    @property
    def cluster(self) -> Client:
        return self

    def leader_for_partition(self, tp: TopicPartition) -> int:
        return 1

    async def send(self, node: int, request: object) -> Response:
        ((topic, ((partition, *_),)),) = request.topics  # type: ignore[attr-defined]
        answer = self.raw[TopicPartition(topic, partition)]
        if isinstance(answer, Exception):
            raise answer
        return Response([(topic, [(partition, 0, 0, answer)])])


@dataclass
class Consumer:
    """`getmany` answers from a script; positions and committed offsets are recorded."""

    answers: list[dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] | Exception]
    committed_at: dict[TopicPartition, int]
    raw: dict[TopicPartition, bytes | Exception] = field(default_factory=dict)
    seeks: list[tuple[TopicPartition, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._client = Client(self.raw)

    def assignment(self) -> set[TopicPartition]:
        return set(self.committed_at)

    async def getmany(
        self, *, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def committed(self, tp: TopicPartition) -> int:
        return self.committed_at[tp]

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 0)


def fetch(consumer: Consumer) -> TolerantFetch:
    return TolerantFetch(consumer, Backoff(initial=0.001, maximum=0.001))  # type: ignore[arg-type]


def undecodable() -> UnicodeDecodeError:
    return UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")


async def test_a_partition_that_cannot_be_read_raw_stays_where_its_records_end() -> None:
    broken = batch(10, 3)
    broken[-1] ^= 0xFF  # its CRC no longer matches
    consumer = Consumer(
        answers=[undecodable(), {}],
        committed_at={A: 10, B: 20},
        raw={A: bytes(broken) + bytes(batch(13, 2)), B: ConnectionError("t[1]'s leader away")},
    )
    got = await fetch(consumer).getmany(timeout_ms=1, max_records=10)

    assert list(got) == [A]
    assert [(type(r), r.offset) for r in got[A]] == [(UndecodableRecord, 12)]
    # Both rewound first; A then moves past its bad batch, B stays where its records end.
    assert consumer.seeks == [(A, 10), (B, 20), (A, 13)]


async def test_an_error_that_is_not_about_fetched_bytes_ends_the_run() -> None:
    consumer = Consumer(answers=[TopicAuthorizationFailedError()], committed_at={A: 0})
    with pytest.raises(TopicAuthorizationFailedError):
        await fetch(consumer).getmany(timeout_ms=1, max_records=10)
    assert consumer.seeks == []


async def test_decoding_errors_no_partition_explains_are_raised_after_five_in_a_row() -> None:
    consumer = Consumer(answers=[undecodable()], committed_at={A: 0}, raw={A: bytes(batch(0, 2))})
    tolerant = fetch(consumer)
    for _ in range(4):
        assert await tolerant.getmany(timeout_ms=1, max_records=10) == {}
    with pytest.raises(UnicodeDecodeError):
        await tolerant.getmany(timeout_ms=1, max_records=10)
    assert set(consumer.seeks) == {(A, 0)}  # rewound each time, never moved past anything


async def test_a_partition_read_again_from_its_start_is_rewound_there_not_to_its_old_end() -> None:
    consumer = Consumer(
        answers=[
            {A: [record(A, 4999)]},
            {A: [record(A, n) for n in range(3)]},  # the log was recreated: read from 0
            undecodable(),
            {},
        ],
        committed_at={A: 0},
        raw={A: b""},
    )
    tolerant = fetch(consumer)
    for _ in range(3):
        await tolerant.getmany(timeout_ms=1, max_records=10)
    assert consumer.seeks == [(A, 3)]


def test_bytes_after_a_batchs_last_record_do_not_deliver_that_record_twice() -> None:
    read = read_batches(A, resealed(batch(0, 3) + b"\x00\x00"), 0)
    assert [r.offset for r in read.records] == [0, 1, 2]
    assert read.undecodable == []
    assert read.next_offset == 3
    assert read.stopped_at_bad_batch  # the salvage moves the partition past it
