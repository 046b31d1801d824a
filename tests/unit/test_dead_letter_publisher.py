"""KafkaDeadLetterPublisher with a producer that has a size limit: the partition keeps moving."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError

from payment.adapters.kafka.dead_letters import KafkaDeadLetterPublisher

Headers = Sequence[tuple[str, bytes | None]]


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers


class LimitedProducer:
    """Refuses any record larger than `limit` bytes, as aiokafka or the broker would."""

    def __init__(self, limit: int, *, down: bool = False) -> None:
        self.limit = limit
        self.down = down
        self.sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes | None]]]] = []

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: Headers | None = None,
    ) -> object:
        if self.down:
            raise KafkaConnectionError("broker down")
        size = len(key or b"") + len(value or b"")
        size += sum(len(n) + len(v or b"") for n, v in headers or ())
        if size > self.limit:
            raise MessageSizeTooLargeError(f"{size} bytes")
        self.sent.append((topic, key, value, list(headers or ())))
        return object()


def record(
    value: bytes | None, headers: Headers = (("ce_id", b"1"),), key: bytes | None = b"booking-1"
) -> Record:
    return Record("requests", 2, 40, key, value, headers)


def header(headers: Headers, name: str) -> bytes | None:
    return next(v for n, v in headers if n == name)


async def test_a_record_that_fits_is_parked_verbatim() -> None:
    producer = LimitedProducer(10_000)
    await KafkaDeadLetterPublisher(producer, "dlq", "group").publish(record(b"{}"), "poison")
    [(topic, key, value, headers)] = producer.sent
    assert (topic, key, value) == ("dlq", b"booking-1", b"{}")
    assert headers[0] == ("ce_id", b"1")
    assert header(headers, "dlq_reason") == b"poison"
    assert not any(n in ("dlq_value_dropped", "dlq_headers_dropped") for n, _ in headers)


async def test_a_value_too_large_to_park_is_dropped_and_said_so() -> None:
    producer = LimitedProducer(1_000)
    big = b"x" * 5_000
    await KafkaDeadLetterPublisher(producer, "dlq", "group").publish(record(big), "too big")
    [(_, key, value, headers)] = producer.sent
    assert key == b"booking-1" and value is None
    assert headers[0] == ("ce_id", b"1"), "the original headers stay"
    assert header(headers, "dlq_value_dropped") == b"5000"
    assert header(headers, "dlq_original_offset") == b"40"


async def test_headers_too_large_are_dropped_as_well() -> None:
    producer = LimitedProducer(1_000)
    huge_headers = [("x-junk", b"j" * 3_000), ("ce_id", b"1")]
    await KafkaDeadLetterPublisher(producer, "dlq", "group").publish(
        record(b"x" * 5_000, huge_headers), "too big"
    )
    [(_, _, value, headers)] = producer.sent
    assert value is None
    assert [n for n, _ in headers if not n.startswith("dlq_")] == []
    assert header(headers, "dlq_headers_dropped") == str(len("x-junk") + 3_000 + 6).encode()


async def test_a_huge_key_goes_first_and_the_value_stays() -> None:
    producer = LimitedProducer(1_000)
    await KafkaDeadLetterPublisher(producer, "dlq", "group").publish(
        record(b"{}", key=b"k" * 5_000), "poison"
    )
    [(_, key, value, headers)] = producer.sent
    assert (key, value) == (None, b"{}")
    assert header(headers, "dlq_key_dropped") == b"5000"
    assert not any(n in ("dlq_value_dropped", "dlq_headers_dropped") for n, _ in headers)


async def test_an_outage_still_propagates_for_the_caller_to_retry() -> None:
    producer = LimitedProducer(1_000, down=True)
    with pytest.raises(KafkaConnectionError):
        await KafkaDeadLetterPublisher(producer, "dlq", "group").publish(record(b"{}"), "p")


async def test_dlq_headers_of_a_redriven_record_are_replaced_whatever_their_case() -> None:
    producer = LimitedProducer(10_000)
    stale = [("ce_id", b"1"), ("dlq_reason", b"old"), ("DLQ_ORIGINAL_OFFSET", b"7")]
    await KafkaDeadLetterPublisher(producer, "dlq", "group").publish(record(b"{}", stale), "new")
    [(_, _, _, headers)] = producer.sent
    assert [v for n, v in headers if n.lower() == "dlq_reason"] == [b"new"]
    assert [v for n, v in headers if n.lower() == "dlq_original_offset"] == [b"40"]
