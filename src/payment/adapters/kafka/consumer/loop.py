"""The inbox consumer's fetch loop: slots for messages in flight, request admission, and
dispatch of records alone or in batches, committed in order (offsets.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, NoOffsetForPartitionError, OffsetOutOfRangeError
from aiokafka.structs import ConsumerRecord
from opentelemetry import trace
from opentelemetry.trace import Tracer

from payment.adapters.kafka.consumer.batch_handling import BatchHandler, Fetched
from payment.adapters.kafka.consumer.dead_lettering import Parking
from payment.adapters.kafka.consumer.handling import Handlers, MessageHandler
from payment.adapters.kafka.consumer.intake_gate import ALWAYS_OPEN, IntakeGate
from payment.adapters.kafka.consumer.offsets import Offsets
from payment.adapters.kafka.consumer.rebalance import Rebalance
from payment.adapters.kafka.consumer.routing import Topics
from payment.adapters.kafka.consumer.slots import Slots
from payment.adapters.kafka.consumer.tolerant_fetch import TolerantFetch
from payment.adapters.kafka.offset_reset import recover_out_of_range, start_from_beginning
from payment.adapters.observability.log_budget import UNLIMITED, LogBudget
from payment.adapters.observability.metrics import Metrics
from payment.application.handlers import ExecutionPolicy, RequestPolicy
from payment.application.ports import Clock, DeadLetters, UnitOfWorkFactory
from payment.application.refunds import Refunds
from payment.application.retry import Backoff
from payment.domain.processor import PaymentProcessor

log = logging.getLogger(__name__)

# Records of one kind fetched together are handled as one batch of at most this many (see
# application/batches.py): a few statements in one transaction for the batch instead of a
# few per message. One record alone takes the single-message path.
MAX_BATCH = 250


class KafkaInboxConsumer:
    """Consumes requests and initiated events in one consumer group.

    Each record becomes a task (bounded by `max_in_flight`); its inbox mark and effects
    commit in one database transaction inside the handler; its Kafka offset is committed
    only after that, in partition order.

    Requests may hold at most three quarters of the slots, and wait for room without
    holding up the fetch loop (their partitions paused): a burst of requests stays on the
    broker and leaves room for payment.initiated (`_admit_requests`). They wait the same
    way while `intake` is closed (the outbox backlog is high: intake_gate.py).
    """

    def __init__(
        self,
        *,
        consumer_factory: Callable[[ConsumerRebalanceListener], Awaitable[AIOKafkaConsumer]],
        request_topic: str,
        initiated_topic: str,
        uow_factory: UnitOfWorkFactory,
        processor: PaymentProcessor,
        clock: Clock,
        dead_letters: DeadLetters,
        metrics: Metrics,
        request_policy: RequestPolicy,
        policy: ExecutionPolicy,
        is_transient: Callable[[BaseException], bool],
        max_in_flight: int = 256,
        retry_initial_s: float = 0.1,
        retry_max_s: float = 5.0,
        max_batch: int = MAX_BATCH,
        commit_interval_s: float = 0.2,
        commit_timeout_s: float = 5.0,
        drain_timeout_s: float = 30.0,
        tracer: Tracer | None = None,
        consumer_group: str | None = None,
        log_budget: LogBudget = UNLIMITED,
        joined: asyncio.Event | None = None,
        refund_topic: str | None = None,
        refunds: Refunds | None = None,
        intake: IntakeGate = ALWAYS_OPEN,
    ) -> None:
        self._consumer_factory = consumer_factory
        self._topics = Topics(request_topic, initiated_topic, refund_topic)
        self._metrics = metrics

        def backoff() -> Backoff:
            return Backoff(initial=retry_initial_s, maximum=retry_max_s)

        self._backoff = backoff
        handlers = Handlers(
            topics=self._topics,
            uow_factory=uow_factory,
            processor=processor,
            clock=clock,
            metrics=metrics,
            request_policy=request_policy,
            policy=policy,
            is_transient=is_transient,
            backoff=backoff,
            parking=Parking(dead_letters, metrics, is_transient, backoff),
            tracer=tracer or trace.get_tracer(__name__),
            consumer_group=consumer_group,
            budget=log_budget,
            # Refund requests (contract 4.8): one by one, through the inbox like the others.
            refunds=refunds,
        )
        self._single = MessageHandler(handlers)
        self._batch = BatchHandler(self._single)
        self._slots = Slots(max_in_flight)
        # A batch holds a slot per record: never more than there are slots.
        self._max_batch = max(1, min(max_batch, max_in_flight))
        # Requests may hold at most this many slots; the rest stay for payment.initiated,
        # so a burst of requests cannot starve the executor (see `_admit_requests`).
        self._request_room = max(1, max_in_flight - max_in_flight // 4)
        self._requests_in_flight = 0
        self._intake = intake
        # Requests fetched but not yet admitted; their partitions are paused meanwhile.
        self._held: list[Fetched] = []
        self._paused = False
        self._batches: dict[asyncio.Task[None], list[Fetched]] = {}
        self._commit_interval_s = commit_interval_s
        self._drain_timeout_s = drain_timeout_s
        self._offsets = Offsets(commit_timeout_s)
        self._tasks: dict[TopicPartition, set[asyncio.Task[None]]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._fetch: TolerantFetch | None = None
        self._stopping = asyncio.Event()
        self.assigned: set[TopicPartition] = set()
        # Set once the group first gave this instance partitions (dev --demo waits on it).
        self.joined = joined if joined is not None else asyncio.Event()
        for topic in self._topics.all():
            for cause in ("poison", "conflict", "handler_error"):
                metrics.messages_dead_lettered.add(0, {"topic": topic, "cause": cause})

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until `stop()`; then finish in-flight work, commit, and leave the group."""
        self._consumer = consumer = await self._consumer_factory(Rebalance(self))
        self._fetch = fetch = TolerantFetch(consumer, self._backoff())
        committer = asyncio.create_task(self._commit_periodically(), name="offset-committer")
        try:
            while not self._stopping.is_set():
                await self._admit_requests()
                try:
                    fetched = await fetch.getmany(timeout_ms=200, max_records=500)
                except NoOffsetForPartitionError as exc:
                    fetch.forget([exc.args[0]])  # its position is no longer after a delivery
                    await start_from_beginning(consumer, exc.args[0], self._metrics)
                    continue
                except OffsetOutOfRangeError as exc:
                    fetch.forget(exc.args[0])
                    for tp, offset in exc.args[0].items():
                        await recover_out_of_range(consumer, tp, offset, self._metrics)
                    continue
                by_topic: dict[str, list[Fetched]] = {}
                for tp, records in fetched.items():
                    by_topic.setdefault(tp.topic, []).extend((tp, r) for r in records)
                # Requests wait for room of their own without holding up the loop; the
                # executor's payment.initiated (and anything unexpected) go as before.
                self._held += by_topic.pop(self._topics.request, [])
                await self._admit_requests()
                for group in by_topic.values():
                    if not await self._dispatch_all(group):
                        break
        finally:
            committer.cancel()
            await self.drain(list(self._tasks))
            await self._commit()
            await consumer.stop()
            log.info("consumer: stopped")

    def stop(self) -> None:
        """Stop fetching; `run` then drains in-flight work and returns."""
        self._stopping.set()

    @property
    def backlog(self) -> int:
        """Requests fetched and waiting for room (their partitions paused meanwhile)."""
        return len(self._held)

    async def _dispatch_all(self, group: list[Fetched]) -> bool:
        """Dispatch fetched records of one topic in batches; False once stopping."""
        for start in range(0, len(group), self._max_batch):
            chunk = group[start : start + self._max_batch]
            if not await self._slots.take(len(chunk), self._stopping):
                return False  # stopping: what is not dispatched is re-read
            # A rebalance may have revoked partitions while we waited for slots: their
            # records now belong to another member.
            kept = [(tp, r) for tp, r in chunk if tp in self.assigned]
            self._slots.release(len(chunk) - len(kept))
            if kept:
                self._dispatch(kept)
        return True

    async def _admit_requests(self) -> None:
        """Dispatch held requests while requests hold fewer than their share of the slots,
        slots are free and the intake gate is open; never waits. While some are left, the
        request partitions are paused: the broker keeps the burst, not this process, and
        the loop goes on fetching payment.initiated, whose handling frees the way.
        """
        while self._held and not self._stopping.is_set():
            room = min(self._request_room - self._requests_in_flight, self._slots.free)
            if room <= 0 or not self._intake.admits_requests:
                break
            chunk = self._held[: min(room, self._max_batch)]
            del self._held[: len(chunk)]
            # Partitions revoked since they were fetched belong to another member now.
            chunk = [(tp, r) for tp, r in chunk if tp in self.assigned]
            if chunk:
                await self._slots.take(len(chunk), self._stopping)  # free now: no wait
                self._dispatch(chunk)
        self._pause_requests(bool(self._held))

    def _pause_requests(self, pause: bool) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        request_topic = self._topics.request
        if pause:
            # Again each time: partitions assigned since are not paused yet.
            mine = [tp for tp in self.assigned if tp.topic == request_topic]
            if mine:
                consumer.pause(*mine)
            if not self._paused:
                log.info(
                    "consumer: %d requests waiting for room; pausing requests", len(self._held)
                )
            self._paused = True
        elif self._paused:
            consumer.resume(*[tp for tp in consumer.paused() if tp.topic == request_topic])
            self._paused = False

    # -- dispatch ----------------------------------------------------------------------

    def _dispatch(self, chunk: list[Fetched]) -> None:
        """One task for records of one topic (any partitions), holding a slot each; one
        record alone takes the single-message path. Offsets move as records finish."""
        started = [(self._offsets.of(tp), record.offset) for tp, record in chunk]
        for progress, offset in started:
            progress.start(offset)
        if len(chunk) == 1:
            task = asyncio.create_task(self._handle(chunk[0][1]))
        else:
            task = asyncio.create_task(self._handle_batch(chunk))
            self._batches[task] = chunk
        sets = {tp: self._tasks.setdefault(tp, set()) for tp, _ in chunk}
        for tasks in sets.values():
            tasks.add(task)
        requests = sum(tp.topic == self._topics.request for tp, _ in chunk)
        self._requests_in_flight += requests

        def done(t: asyncio.Task[None]) -> None:
            self._batches.pop(t, None)
            for tasks in sets.values():
                tasks.discard(t)
            self._slots.release(len(chunk))
            self._requests_in_flight -= requests
            # A cancelled or crashed task did not finish its messages: their offsets must
            # not move (a restart or the next owner redelivers them).
            if not t.cancelled() and t.exception() is None:
                for progress, offset in started:
                    progress.finish(offset)

        task.add_done_callback(done)

    async def _handle(self, record: ConsumerRecord[bytes, bytes], *, counted: bool = False) -> None:
        await self._single.handle(record, counted=counted)

    async def _handle_batch(self, chunk: list[Fetched]) -> None:
        await self._batch.handle(chunk)

    # -- lag ---------------------------------------------------------------------------

    async def lag(self) -> dict[TopicPartition, int]:
        """Per assigned partition with a known highwater: highwater minus our position."""
        consumer = self._consumer
        if consumer is None:
            return {}
        lags: dict[TopicPartition, int] = {}
        for tp in consumer.assignment():
            try:
                highwater = consumer.highwater(tp)
                if highwater is None:
                    continue
                async with asyncio.timeout(0.5):
                    position = await consumer.position(tp)
            except (IllegalStateError, AssertionError, TimeoutError):
                continue  # revoked meanwhile, or no position yet
            lags[tp] = max(highwater - position, 0)
        return lags

    # -- offsets and rebalancing (rebalance.py calls these) ----------------------------

    async def _commit_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._commit_interval_s)
            await self._commit()

    async def _commit(self) -> None:
        await self.commit(self.assigned)

    async def commit(self, only: Collection[TopicPartition]) -> None:
        """Commit the partitions named (this member's, or those being revoked, by name)."""
        if self._consumer is not None:
            await self._offsets.commit(self._consumer, only)

    async def drain(self, partitions: Collection[TopicPartition]) -> None:
        tasks = [t for tp in partitions for t in self._tasks.get(tp, ())]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self._drain_timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            log.warning(
                "consumer: %d messages unfinished at drain; they will be redelivered", len(pending)
            )
            kept = [
                (tp, record)
                for task in pending
                for tp, record in self._batches.get(task, ())
                if tp not in partitions and tp in self.assigned
            ]
            await asyncio.wait(pending)
            # A cancelled batch may hold records of partitions this instance keeps: nobody
            # would redeliver those, so they are handled again here, one by one.
            for fetched in kept:
                await self._slots.take(1)
                self._dispatch([fetched])

    def release(self, revoked: set[TopicPartition]) -> None:
        self.assigned -= revoked
        self._held = [(tp, r) for tp, r in self._held if tp not in revoked]

    def forget(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            self._offsets.forget(tp)
            self._tasks.pop(tp, None)
        if self._fetch is not None:
            self._fetch.forget(partitions)

    def acquire(self, assigned: set[TopicPartition]) -> None:
        self.assigned |= assigned
        if self._fetch is not None:
            self._fetch.forget(assigned)  # read again from the group's commit
        if assigned:
            self.joined.set()
