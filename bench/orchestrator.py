"""The load generator's orchestrator: requests offered open loop, outcomes matched to them.

Request *n* is sent at `start + n / rate` whatever the answers so far (offered_requests.py),
keyed by its booking id, and the outcome events are read from the end of
`payment.completed` / `payment.failed`; a request's latency runs from its scheduled send
to the moment its outcome came out of the consumer. aiokafka, as the service uses: a
librdkafka orchestrator took half the CPU and measured the same end to end
(docs/performance.md, session 18).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from offered_requests import Headers, offer_on_schedule, outcome_booking, wait_for_answers

from payment.adapters.kafka.topics import Topics


class Orchestrator:
    """Sends requests on a schedule and matches the outcome events to them."""

    def __init__(self, bootstrap: str, topics: Topics, run_id: str, fetch_wait_ms: int) -> None:
        self._bootstrap = bootstrap
        self._fetch_wait_ms = fetch_wait_ms
        self._topics = topics
        self._source = f"bench-e2e-{run_id}".encode()
        self.sent_at: dict[str, float] = {}
        self.latency: dict[str, float] = {}
        self.last_outcome = 0.0
        self.send_failures = 0
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._listener: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Orchestrator:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            enable_idempotence=False,
            acks=1,
            linger_ms=0,  # the load generator adds no wait of its own (issue 15)
            max_batch_size=256 * 1024,
        )
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            group_id=None,
            fetch_max_wait_ms=self._fetch_wait_ms,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await self._consumer.start()
        partitions: list[TopicPartition] = []
        for topic in (self._topics.completed, self._topics.failed):
            found = await self._producer.partitions_for(topic)
            partitions += [TopicPartition(topic, p) for p in sorted(found)]
        self._consumer.assign(partitions)
        await self._consumer.seek_to_end(*partitions)
        for tp in partitions:
            await self._consumer.position(tp)  # resolve the end offsets before sending
        self._listener = asyncio.create_task(self._listen())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def _listen(self) -> None:
        assert self._consumer is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._consumer.getmany(timeout_ms=100, max_records=5000)
            now = loop.time()
            for records in batch.values():
                for record in records:
                    booking = outcome_booking(record.value)
                    sent = self.sent_at.get(booking) if booking is not None else None
                    if sent is not None and booking not in self.latency:
                        self.latency[booking] = now - sent
                        self.last_outcome = now

    def _count_failure(self, future: asyncio.Future[object]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self.send_failures += 1

    async def _send(self, booking: str, value: bytes, headers: Headers) -> None:
        assert self._producer is not None
        future = await self._producer.send(
            self._topics.request, value=value, key=booking.encode(), headers=headers
        )
        future.add_done_callback(self._count_failure)

    async def offer(self, prefix: str, rate: float, duration_s: float) -> tuple[list[str], float]:
        """Send `rate` requests/s for `duration_s` on schedule; (booking ids, worst lag s)."""
        assert self._producer is not None
        sent = await offer_on_schedule(
            prefix, rate, duration_s, self.sent_at, self._send, self._source
        )
        await self._producer.flush()
        return sent

    async def wait_answered(self, bookings: Sequence[str], timeout_s: float) -> int:
        return await wait_for_answers(self.latency, bookings, timeout_s)
