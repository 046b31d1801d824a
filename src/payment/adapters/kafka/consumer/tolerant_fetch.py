"""`getmany` that no fetched bytes can stop (contract 4.5: the partition keeps moving).

When aiokafka raises while decoding what it fetched (see `undecodable.py`), it has
already dropped every record of that `getmany` call, of every partition, and moved some
partitions' positions past them. `TolerantFetch` then puts each assigned partition back
where its last delivered record left it, fetches the partitions' raw record batches
itself, reads them with `read_batches`, and hands over the records of the batches up to
and including the first undecodable one (its undecodable records as `UndecodableRecord`,
which the consumer dead-letters), moving that partition past them. An error it cannot
place in any partition is logged and the fetch is tried again after a back-off: never
raised, so no instance exits over it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import ConsumerStoppedError, NoOffsetForPartitionError, OffsetOutOfRangeError
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
        except Exception as exc:  # a record batch aiokafka cannot decode, most likely
            fetched = await self._recover(exc)
        for tp, records in fetched.items():
            if records:
                self._next[tp] = max(self._next.get(tp, 0), records[-1].offset + 1)
        return fetched

    async def _recover(self, error: Exception) -> Records:
        kind = type(error).__name__
        try:
            salvaged = await self._salvage()
        except Exception as exc:  # the broker away meanwhile, say: the fetch is tried again
            log.warning("consumer: fetch failed (%s), then reading it raw failed (%s)", kind, exc)
            salvaged = {}
        if salvaged:
            self._backoff.reset()
            return salvaged
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

    async def _salvage(self) -> Records:
        consumer = self._consumer
        salvaged: Records = {}
        for tp in sorted(consumer.assignment()):
            start = await self._delivered_up_to(tp)
            if start is None:
                continue
            read = read_batches(tp, await self._raw_fetch(tp, start), start)
            bad = read.undecodable
            if not bad or read.next_offset is None:
                consumer.seek(tp, start)  # back to where the failed call found it
                continue
            salvaged[tp] = read.records
            consumer.seek(tp, read.next_offset)
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
