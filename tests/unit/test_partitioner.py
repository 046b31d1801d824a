"""The producer's partitioner picks the partition every Kafka client picks for a key."""

from __future__ import annotations

import ctypes
import uuid

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given
from hypothesis import strategies as st

from payment.adapters.kafka.partitioner import key_partitioner, murmur2
from payment.adapters.kafka.producer import create_producer

# Kafka's own test vectors (the Java client's UtilsTest.testMurmur2), as signed 32 bits.
JAVA_MURMUR2 = {
    "21": -973932308,
    "foobar": -790332482,
    "a-little-bit-long-string": -985981536,
    "a-little-bit-longer-string": -1486304829,
    "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    "abc": 479470107,
}


@pytest.mark.parametrize(("text", "expected"), sorted(JAVA_MURMUR2.items()))
def test_murmur2_matches_the_java_client(text: str, expected: int) -> None:
    assert ctypes.c_int32(murmur2(text.encode())).value == expected


@given(st.binary(max_size=200))
def test_murmur2_matches_aiokafka_for_any_bytes(data: bytes) -> None:
    # Every length, so every tail of 0-3 bytes after the whole words.
    assert murmur2(data) == aiokafka_murmur2(data)


@given(
    key=st.one_of(st.binary(min_size=1, max_size=80), st.uuids().map(lambda u: str(u).encode())),
    partitions=st.integers(min_value=1, max_value=64),
)
def test_a_key_goes_where_the_default_partitioner_sends_it(key: bytes, partitions: int) -> None:
    every = list(range(partitions))
    assert key_partitioner(key, every, every) == DefaultPartitioner()(key, every, every)


def test_a_key_maps_to_its_partition_even_when_that_one_is_unavailable() -> None:
    key = str(uuid.UUID(int=7)).encode()
    every = list(range(6))
    chosen = key_partitioner(key, every, every)
    others = [p for p in every if p != chosen]
    # Keyed records keep their partition (ordering per payment), available or not.
    assert key_partitioner(key, every, others) == chosen


def test_a_record_without_key_goes_to_an_available_partition() -> None:
    picks = {key_partitioner(None, [0, 1, 2, 3], [1, 3]) for _ in range(200)}
    assert picks == {1, 3}


def test_without_available_partitions_any_partition_will_do() -> None:
    picks = {key_partitioner(None, [0, 1, 2], []) for _ in range(200)}
    assert picks <= {0, 1, 2}
    assert len(picks) > 1


async def test_the_service_producer_uses_it() -> None:
    producer = create_producer("127.0.0.1:9")
    try:
        assert producer._partitioner is key_partitioner
    finally:
        await producer.stop()
