"""`getmany` that no fetched bytes can stop (contract 4.5: the partition keeps moving).

When aiokafka raises while decoding what it fetched (see `undecodable.py`), it has
already dropped every record of that `getmany` call, of every partition, and moved some
partitions' positions past them. `TolerantFetch` then puts each assigned partition back
where its last delivered record left it, fetches the partitions' raw record batches
itself, reads them with `read_batches`, and hands over the records of the batches up to
and including the first undecodable one (its undecodable records as `UndecodableRecord`,
which the consumer dead-letters), moving that partition past them. A decoding error it
cannot place in any partition is logged and the fetch is tried again after a back-off;
after `_GIVE_UP_AFTER` such errors in a row it is raised, as is every error of the
client that is not about the fetched bytes (authorisation, a record too large for the
fetch size, the group coordination failing): those end the run, as they always did.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import (
    ConsumerStoppedError,
    CorruptRecordException,
    KafkaError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    UnsupportedCodecError,
)
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.structs import ConsumerRecord

from payment.adapters.kafka.consumer.undecodable import read_batches
from payment.application.retry import Backoff

log = logging.getLogger(__name__)

Records = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]

# Raised by `getmany` for reasons the consumer loop handles itself.
_PASSED_ON = (NoOffsetForPartitionError, OffsetOutOfRangeError, ConsumerStoppedError)
_RAW_FETCH_BYTES = 1024 * 1024  # a larger first batch still comes whole (KIP-74)
# Tansu answers a fetch when its wait expires, with nothing if the wait is 0.
_RAW_FETCH_WAIT_MS = 100
# The client's own errors about fetched bytes; every other KafkaError is not ours to hide.
_DECODING_ERRORS = (CorruptRecordException, UnsupportedCodecError)
# A salvage is bounded (the consumer's stop waits for it): past this, the fetch is retried.
_SALVAGE_TIMEOUT_S = 20.0
# Decoding errors in a row that no partition explains before the error is raised.
_GIVE_UP_AFTER = 5


class TolerantFetch:
    """Wraps one consumer's `getmany`; `forget` the partitions a rebalance takes or gives."""

    def __init__(self, consumer: AIOKafkaConsumer, backoff: Backoff) -> None:
        self._consumer = consumer
        self._backoff = backoff
        # Per partition, the offset after the last record handed over.
        self._next: dict[TopicPartition, int] = {}

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self._next.pop(tp, None)

    async def getmany(self, *, timeout_ms: int, max_records: int) -> Records:
        try:
            fetched: Records = await self._consumer.getmany(
                timeout_ms=timeout_ms, max_records=max_records
            )
        except _PASSED_ON:
            raise
        except KafkaError as exc:
            if not isinstance(exc, _DECODING_ERRORS):
                raise
            fetched = await self._recover(exc)
        except Exception as exc:  # bytes aiokafka's parser chokes on (UnicodeDecodeError, …)
            fetched = await self._recover(exc)
        for tp, records in fetched.items():
            if records:
                self._next[tp] = records[-1].offset + 1
        return fetched

    async def _recover(self, error: Exception) -> Records:
        kind = type(error).__name__
        # Back where the failed call found every partition first: aiokafka may have moved
        # positions past the records it dropped. If even that fails, the error ends the
        # run (the group's commits are safe) rather than lose records.
        try:
            async with asyncio.timeout(_SALVAGE_TIMEOUT_S):
                starts = await self._rewind()
        except Exception as exc:
            log.error("consumer: fetch failed (%s), then rewinding failed (%r)", kind, exc)
            raise error from exc
        try:
            async with asyncio.timeout(_SALVAGE_TIMEOUT_S):
                salvaged = await self._salvage(starts)
        except Exception as exc:  # the broker away meanwhile, say: the fetch is tried again
            log.warning("consumer: fetch failed (%s), then reading it raw failed (%r)", kind, exc)
            salvaged = {}
        if salvaged:
            self._backoff.reset()
            return salvaged
        if self._backoff.attempts + 1 >= _GIVE_UP_AFTER:
            log.error("consumer: fetch failed %d times in a row (%s)", _GIVE_UP_AFTER, kind)
            raise error
        delay = self._backoff.next()
        log.error(
            "consumer: fetch failed (%s: %s) and no partition holds an undecodable record; "
            "fetching again in %.1fs",
            kind,
            str(error)[:200],
            delay,
        )
        await asyncio.sleep(delay)
        return {}

    async def _rewind(self) -> dict[TopicPartition, int]:
        """Seek every assigned partition to where its delivered records end; those offsets."""
        starts: dict[TopicPartition, int] = {}
        for tp in sorted(self._consumer.assignment()):
            start = await self._delivered_up_to(tp)
            if start is not None:
                self._consumer.seek(tp, start)
                starts[tp] = start
        return starts

    async def _salvage(self, starts: dict[TopicPartition, int]) -> Records:
        """Each partition's records up to its first undecodable batch, the partition moved
        past it; a partition that fails to be read stays where it was rewound to."""
        salvaged: Records = {}
        for tp, start in starts.items():
            try:
                read = read_batches(tp, await self._raw_fetch(tp, start), start)
            except Exception as exc:  # that partition's leader away, say: next time
                log.warning("consumer: reading %s[%d] raw failed (%r)", tp.topic, tp.partition, exc)
                continue
            if not read.stopped_at_bad_batch or read.next_offset is None:
                continue
            salvaged[tp] = read.records
            self._consumer.seek(tp, read.next_offset)
            bad = read.undecodable
            if not bad:
                log.warning(
                    "consumer: %s[%d] before offset %d: a batch the client library cannot "
                    "decode whose records could all be read; they are handled as usual",
                    tp.topic,
                    tp.partition,
                    read.next_offset,
                )
            for record in bad:
                log.error(
                    "consumer: %s[%d]@%d cannot be decoded by the client library (%s); "
                    "it is dead-lettered and the partition moves on",
                    tp.topic,
                    tp.partition,
                    record.offset,
                    record.reason,
                )
        return salvaged

    async def _delivered_up_to(self, tp: TopicPartition) -> int | None:
        """Where reading `tp` goes on: after its last record handed over, else (none since it
        was assigned) its committed offset, else its beginning."""
        start = self._next.get(tp)
        if start is None:
            start = await self._consumer.committed(tp)
        if start is None:
            start = (await self._consumer.beginning_offsets([tp])).get(tp)
        return start

    async def _raw_fetch(self, tp: TopicPartition, offset: int) -> bytes:
        """The partition's record set from `offset`, as the leader sends it."""
        # aiokafka's client: the consumer's own connections and metadata.
        client = getattr(self._consumer, "_client", None)
        if client is None:
            return b""
        node = client.cluster.leader_for_partition(tp)
        if node is None or node < 0:
            return b""
        request = FetchRequest(
            _RAW_FETCH_WAIT_MS,
            1,
            _RAW_FETCH_BYTES,
            0,
            [(tp.topic, [(tp.partition, offset, _RAW_FETCH_BYTES)])],
        )
        response = await client.send(node, request)
        for topic, partitions in response.topics:
            for partition, error_code, _highwater, *data in partitions:
                if (topic, partition) == (tp.topic, tp.partition) and not error_code:
                    return bytes(data[-1] or b"")
        return b""
