"""The inbox consumer: payment and refund requests and initiated events, handled concurrently,
committed in order."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
)
from aiokafka.structs import ConsumerRecord
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from payment.adapters.kafka.cloudevents import (
    InboundEvent,
    PoisonMessage,
    decode_initiated,
    decode_record,
    decode_refund,
    decode_request,
)
from payment.adapters.kafka.offset_reset import recover_out_of_range, start_from_beginning
from payment.adapters.observability.log_budget import UNLIMITED, LogBudget
from payment.adapters.observability.metrics import Metrics
from payment.adapters.observability.span_values import untrusted_attribute
from payment.adapters.observability.telemetry import context_from_trace, trace_headers_of_record
from payment.application import failpoints
from payment.application.batches import execute_payments, request_payments
from payment.application.commands import (
    ExecutePayment,
    InboundRef,
    RefundPayment,
    RequestPayment,
    SettleRefunds,
    TraceHeaders,
)
from payment.application.errors import PaymentConflict
from payment.application.handlers import (
    ExecuteResult,
    ExecutionPolicy,
    RequestResult,
    Settings,
    execute_payment,
    request_payment,
)
from payment.application.messages import PAYMENT_INITIATED, REFUND_PAYMENT, REQUEST_PAYMENT
from payment.application.ports import Clock, DeadLetters, UnitOfWorkFactory
from payment.application.refunds import RefundResult, Refunds
from payment.application.retry import Backoff
from payment.domain.processor import PaymentProcessor

log = logging.getLogger(__name__)

# A handler error that is not an outage is retried this many times, then dead-lettered:
# a bug must not block a partition forever, an outage must never dead-letter anything.
MAX_HANDLER_ERRORS = 5

# Records of one kind fetched together are handled as one batch of at most this many (see
# application/batches.py): a few statements in one transaction for the batch instead of a
# few per message. One record alone takes the single-message path.
MAX_BATCH = 250

_W3C = TraceContextTextMapPropagator()

Fetched = tuple[TopicPartition, ConsumerRecord[bytes, bytes]]

# Request results worth a log line of their own; an accepted request is logged by the
# unit of work as "payment initiated".
_NOTABLE_REQUESTS = frozenset(
    {
        RequestResult.DUPLICATE,
        RequestResult.REJECTED,
        RequestResult.REPLAYED,
        RequestResult.IN_FLIGHT,
    }
)
_NOTABLE_EXECUTIONS = frozenset(
    {ExecuteResult.DUPLICATE, ExecuteResult.NOT_FOUND, ExecuteResult.ALREADY_TERMINAL}
)


class PartitionProgress:
    """Offsets of one partition: which are still being handled, and what may be committed.

    Messages finish out of order (a slow gateway call beside fast ones); the committed
    offset never passes the lowest message not yet finished, so a crash redelivers at
    most the unfinished ones (and the inbox absorbs the finished ones among them).
    """

    def __init__(self) -> None:
        self.unfinished: set[int] = set()
        self.highest = -1
        self.committed = -1

    def start(self, offset: int) -> None:
        self.unfinished.add(offset)
        self.highest = max(self.highest, offset)

    def finish(self, offset: int) -> None:
        self.unfinished.discard(offset)

    def committable(self) -> int | None:
        """The next offset to consume, if it moved since the last commit."""
        nxt = min(self.unfinished) if self.unfinished else self.highest + 1
        return nxt if nxt > self.committed and nxt > 0 else None


class KafkaInboxConsumer:
    """Consumes requests and initiated events in one consumer group.

    Each record becomes a task (bounded by `max_in_flight`); its inbox mark and effects
    commit in one database transaction inside the handler; its Kafka offset is committed
    only after that, in partition order.

    Requests may hold at most three quarters of the slots, and wait for room without
    holding up the fetch loop (their partitions paused): a burst of requests stays on the
    broker and leaves room for payment.initiated (`_admit_requests`).
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
        settings: Settings,
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
    ) -> None:
        self._consumer_factory = consumer_factory
        # Refund requests (contract 4.8): one by one, through the inbox like the others.
        self._refund_topic = refund_topic
        self._refunds = refunds
        self._commit_timeout_s = commit_timeout_s
        self._request_topic = request_topic
        self._initiated_topic = initiated_topic
        self._uow_factory = uow_factory
        self._processor = processor
        self._clock = clock
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._settings = settings
        self._policy = policy
        self._is_transient = is_transient
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._slots = asyncio.Semaphore(max_in_flight)
        # Requests may hold at most this many slots; the rest stay for payment.initiated,
        # so a burst of requests cannot starve the executor (see `_admit_requests`).
        self._request_room = max(1, max_in_flight - max_in_flight // 4)
        self._requests_in_flight = 0
        # Requests fetched but not yet admitted; their partitions are paused meanwhile.
        self._held: list[Fetched] = []
        self._paused = False
        # A batch holds a slot per record: never more than there are slots.
        self._max_batch = max(1, min(max_batch, max_in_flight))
        self._batches: dict[asyncio.Task[None], list[Fetched]] = {}
        self._commit_interval_s = commit_interval_s
        self._drain_timeout_s = drain_timeout_s
        self._tracer = tracer or trace.get_tracer(__name__)
        self._consumer_group = consumer_group
        self._budget = log_budget
        self._progress: dict[TopicPartition, PartitionProgress] = {}
        self._tasks: dict[TopicPartition, set[asyncio.Task[None]]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._stopping = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self.assigned: set[TopicPartition] = set()
        # Set once the group first gave this instance partitions (dev --demo waits on it).
        self.joined = joined if joined is not None else asyncio.Event()
        for topic in (request_topic, initiated_topic, *([refund_topic] if refund_topic else [])):
            for cause in ("poison", "conflict", "handler_error"):
                metrics.messages_dead_lettered.add(0, {"topic": topic, "cause": cause})

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until `stop()`; then finish in-flight work, commit, and leave the group."""
        self._consumer = await self._consumer_factory(_Rebalance(self))
        committer = asyncio.create_task(self._commit_periodically(), name="offset-committer")
        try:
            while not self._stopping.is_set():
                await self._admit_requests()
                try:
                    fetched = await self._consumer.getmany(timeout_ms=200, max_records=500)
                except NoOffsetForPartitionError as exc:
                    await start_from_beginning(self._consumer, exc.args[0], self._metrics)
                    continue
                except OffsetOutOfRangeError as exc:
                    for tp, offset in exc.args[0].items():
                        await recover_out_of_range(self._consumer, tp, offset, self._metrics)
                    continue
                by_topic: dict[str, list[Fetched]] = {}
                for tp, records in fetched.items():
                    by_topic.setdefault(tp.topic, []).extend((tp, r) for r in records)
                # Requests wait for room of their own without holding up the loop; the
                # executor's payment.initiated (and anything unexpected) go as before.
                self._held += by_topic.pop(self._request_topic, [])
                await self._admit_requests()
                for group in by_topic.values():
                    for start in range(0, len(group), self._max_batch):
                        if self._stopping.is_set():
                            break
                        chunk = group[start : start + self._max_batch]
                        taken = 0
                        while taken < len(chunk) and await self._slot_or_stop():
                            taken += 1
                        if taken < len(chunk):  # stopping: what is not dispatched is re-read
                            for _ in range(taken):
                                self._slots.release()
                            break
                        # A rebalance may have revoked partitions while we waited for
                        # slots: their records now belong to another member.
                        kept = [(tp, r) for tp, r in chunk if tp in self.assigned]
                        for _ in range(len(chunk) - len(kept)):
                            self._slots.release()
                        chunk = kept
                        if not chunk:
                            continue
                        if len(chunk) == 1:
                            self._dispatch(*chunk[0])
                        else:
                            self._dispatch_batch(chunk)
        finally:
            committer.cancel()
            await self._drain(list(self._tasks))
            await self._commit()
            await self._consumer.stop()
            log.info("consumer: stopped")

    def stop(self) -> None:
        """Stop fetching; `run` then drains in-flight work and returns."""
        self._stopping.set()

    @property
    def backlog(self) -> int:
        """Requests fetched and waiting for room (their partitions paused meanwhile)."""
        return len(self._held)

    async def _admit_requests(self) -> None:
        """Dispatch held requests while requests hold fewer than their share of the slots
        and slots are free; never waits. While some are left, the request partitions are
        paused: the broker keeps the burst, not this process, and the loop goes on
        fetching payment.initiated, whose handling frees the way.
        """
        while self._held and not self._stopping.is_set():
            # Semaphore._value: the slots free now (typeshed declares it).
            room = min(self._request_room - self._requests_in_flight, self._slots._value)
            if room <= 0:
                break
            chunk = self._held[: min(room, self._max_batch)]
            del self._held[: len(chunk)]
            # Partitions revoked since they were fetched belong to another member now.
            chunk = [(tp, r) for tp, r in chunk if tp in self.assigned]
            if not chunk:
                continue
            for _ in chunk:
                await self._slots.acquire()  # free now: no wait
            if len(chunk) == 1:
                self._dispatch(*chunk[0])
            else:
                self._dispatch_batch(chunk)
        self._pause_requests(bool(self._held))

    def _pause_requests(self, pause: bool) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        if pause:
            # Again each time: partitions assigned since are not paused yet.
            mine = [tp for tp in self.assigned if tp.topic == self._request_topic]
            if mine:
                consumer.pause(*mine)
            if not self._paused:
                log.info(
                    "consumer: %d requests waiting for room; pausing requests", len(self._held)
                )
            self._paused = True
        elif self._paused:
            consumer.resume(*[tp for tp in consumer.paused() if tp.topic == self._request_topic])
            self._paused = False

    async def _slot_or_stop(self) -> bool:
        """Take a slot for one more message; False (no slot taken) once `stop()` is called.

        Every slot may be held by work that cannot finish (an outage: handlers retry
        until it ends): waiting for a slot alone would keep `run` from ever reaching its
        drain, whose timeout bounds the shutdown.
        """
        if self._stopping.is_set():
            return False
        if not self._slots.locked():
            await self._slots.acquire()  # free now: no wait
            return True
        acquiring = asyncio.ensure_future(self._slots.acquire())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            acquiring.cancel()  # a no-op if the slot was taken meanwhile
        try:
            await acquiring
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # `run` itself is being cancelled
            return False
        if self._stopping.is_set():
            self._slots.release()
            return False
        return True

    # -- dispatch ----------------------------------------------------------------------

    def _dispatch(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        progress = self._progress.setdefault(tp, PartitionProgress())
        progress.start(record.offset)
        task = asyncio.create_task(self._handle(record))
        tasks = self._tasks.setdefault(tp, set())
        tasks.add(task)
        requests = int(tp.topic == self._request_topic)
        self._requests_in_flight += requests

        def done(t: asyncio.Task[None]) -> None:
            tasks.discard(t)
            self._slots.release()
            self._requests_in_flight -= requests
            # A cancelled or crashed task did not finish its message: its offset must
            # not move (a restart or the next owner redelivers it).
            if not t.cancelled() and t.exception() is None:
                progress.finish(record.offset)

        task.add_done_callback(done)

    def _dispatch_batch(self, chunk: list[Fetched]) -> None:
        """One task for records of one topic (any partitions); offsets move as one by one."""
        progresses = []
        for tp, record in chunk:
            progress = self._progress.setdefault(tp, PartitionProgress())
            progress.start(record.offset)
            progresses.append((progress, record.offset))
        task = asyncio.create_task(self._handle_batch(chunk))
        self._batches[task] = chunk
        sets = {tp: self._tasks.setdefault(tp, set()) for tp, _ in chunk}
        for tasks in sets.values():
            tasks.add(task)
        requests = sum(tp.topic == self._request_topic for tp, _ in chunk)
        self._requests_in_flight += requests

        def done(t: asyncio.Task[None]) -> None:
            self._batches.pop(t, None)
            for tasks in sets.values():
                tasks.discard(t)
            for _ in chunk:
                self._slots.release()
            self._requests_in_flight -= requests
            if not t.cancelled() and t.exception() is None:
                for progress, offset in progresses:
                    progress.finish(offset)

        task.add_done_callback(done)

    def _span(self, record: ConsumerRecord[bytes, bytes]) -> Span:
        """The CONSUMER span of one message, continuing the sender's trace (not made current)."""
        attributes: dict[str, str | int] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.destination.name": record.topic,
            "messaging.destination.partition.id": str(record.partition),
            "messaging.kafka.offset": record.offset,
        }
        if self._consumer_group is not None:
            attributes["messaging.consumer.group.name"] = self._consumer_group
        return self._tracer.start_span(
            f"process {record.topic}",
            context=context_from_trace(trace_headers_of_record(record.headers or ())),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        )

    async def _handle(self, record: ConsumerRecord[bytes, bytes], *, counted: bool = False) -> None:
        # One CONSUMER span per message, retries included, continuing the sender's trace.
        with trace.use_span(
            self._span(record),
            end_on_exit=True,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            while True:
                try:
                    await self._handle_in(record, span, counted=counted)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # The error handling itself failed (dead-letter publish, logging,
                    # metrics): the message is neither handled nor parked, so it must
                    # not be let go. Try the whole thing again.
                    log.exception(
                        "consumer: could not handle or park %s[%d]@%d; retrying",
                        record.topic,
                        record.partition,
                        record.offset,
                    )
                    await asyncio.sleep(1.0)

    async def _handle_batch(self, chunk: list[Fetched]) -> None:
        """Handle records of one topic together; anything unusual goes one by one.

        Records that do not decode, and every record of a batch whose handler raised (an
        outage, a bug), take the single-message path with its retries and dead letters.
        """
        topic = chunk[0][1].topic
        if topic == self._refund_topic:
            for _, record in sorted(chunk, key=lambda f: (f[1].partition, f[1].offset)):
                await self._handle(record)
            return
        counted = topic == self._request_topic
        if counted:
            self._metrics.requests_received.add(len(chunk))
        decoded: list[tuple[ConsumerRecord[bytes, bytes], InboundEvent, Span]] = []
        alone: list[ConsumerRecord[bytes, bytes]] = []
        for _, record in chunk:
            try:
                event = decode_record(record)
                expected = REQUEST_PAYMENT if counted else PAYMENT_INITIATED
                if topic not in (self._request_topic, self._initiated_topic):
                    raise PoisonMessage(f"unexpected topic {topic}")
                if event.type != expected:
                    raise PoisonMessage(f"unexpected ce_type on {topic}")
            except PoisonMessage:
                alone.append(record)
                continue
            span = self._span(record)
            _tag_event(span, event)
            decoded.append((record, event, span))
        # The batch handlers take records whose body does not decode out of `decoded` and
        # return them for one by one handling: if the batch fails, they are among these.
        batched = [record for record, _, _ in decoded]
        try:
            if counted:
                alone += await self._request_batch(decoded)
            else:
                alone += await self._initiated_batch(decoded)
        except asyncio.CancelledError:
            for _, _, span in decoded:
                span.set_attribute("error.type", "cancelled")
                span.end()
            raise
        except Exception as exc:  # the batch's outermost handler: one by one instead
            log.warning(
                "consumer: batch of %d on %s failed (%s); handling them one by one",
                len(batched),
                topic,
                type(exc).__name__,
            )
            for _, _, span in decoded:
                span.set_attribute("payment.batch.fallback", type(exc).__name__)
                span.end()
            alone += batched
        else:
            for _, _, span in decoded:
                span.end()
        for record in sorted(alone, key=lambda r: (r.partition, r.offset)):
            await self._handle(record, counted=counted)

    async def _request_batch(
        self, decoded: list[tuple[ConsumerRecord[bytes, bytes], InboundEvent, Span]]
    ) -> list[ConsumerRecord[bytes, bytes]]:
        """Requests through `request_payments`; the records left for one by one handling."""
        cmds: list[RequestPayment] = []
        items: list[tuple[ConsumerRecord[bytes, bytes], InboundEvent, Span]] = []
        alone: list[ConsumerRecord[bytes, bytes]] = []
        for record, event, span in decoded:
            try:
                data = decode_request(event.data)
            except PoisonMessage:
                span.end()
                alone.append(record)
                continue
            span.set_attribute("payment.booking_id", untrusted_attribute(data.booking_id))
            cmds.append(
                RequestPayment(
                    inbound=InboundRef(source=event.source, message_id=event.id),
                    booking_id=data.booking_id,
                    amount=data.amount,
                    currency=data.currency,
                    payment_method=data.payment_method,
                    customer_id=data.customer_id,
                    saga_id=data.saga_id,
                    trace=_trace_of(span, event),
                )
            )
            items.append((record, event, span))
        decoded[:] = items
        results = await request_payments(cmds, self._uow_factory, self._clock, self._settings)
        tally: Counter[RequestResult] = Counter()
        for (record, event, span), cmd, result in zip(items, cmds, results, strict=True):
            with trace.use_span(span, end_on_exit=False):
                if isinstance(result, PaymentConflict):
                    span.set_attribute("payment.id", str(result.payment_id))
                    await self._park(
                        record,
                        f"conflict: {result.detail} (payment {result.payment_id})",
                        cause="conflict",
                    )
                    await self._mark_handled(cmd.inbound)
                else:
                    self._requested(event, cmd.booking_id, result, span, tally)
        # Counters once per result of the batch, not once per message.
        for result, count in tally.items():
            self._count_requests(result, count)
        return alone

    def _requested(
        self,
        event: InboundEvent,
        booking_id: str,
        result: RequestResult,
        span: Span,
        tally: Counter[RequestResult] | None = None,
    ) -> None:
        span.set_attribute("payment.result", result.value)
        if tally is None:
            self._count_requests(result, 1)
        else:
            tally[result] += 1
        if result in _NOTABLE_REQUESTS and self._budget.allow(f"request {result.value}"):
            log.info(
                "request %s: %s",
                event.id[:80],
                result.value,
                extra={"booking_id": untrusted_attribute(booking_id), "result": result.value},
            )

    def _count_requests(self, result: RequestResult, count: int) -> None:
        self._metrics.requests_handled.add(count, {"result": result.value})
        if result is RequestResult.DUPLICATE:
            self._metrics.requests_deduplicated.add(count)
        elif result is RequestResult.REJECTED:
            self._metrics.requests_invalid.add(count)
            self._metrics.outcomes.add(count, {"outcome": "failed", "reason": "invalid_request"})

    async def _initiated_batch(
        self, decoded: list[tuple[ConsumerRecord[bytes, bytes], InboundEvent, Span]]
    ) -> list[ConsumerRecord[bytes, bytes]]:
        """Executions through `execute_payments`; the records left for one by one handling."""
        cmds: list[ExecutePayment] = []
        items: list[tuple[ConsumerRecord[bytes, bytes], InboundEvent, Span]] = []
        spans: dict[int, Span] = {}  # by id() of the command
        alone: list[ConsumerRecord[bytes, bytes]] = []
        for record, event, span in decoded:
            try:
                payment_id = decode_initiated(event.data)
            except PoisonMessage:
                span.end()
                alone.append(record)
                continue
            span.set_attribute("payment.id", str(payment_id))
            cmd = ExecutePayment(
                inbound=InboundRef(source=event.source, message_id=event.id),
                payment_id=payment_id,
                trace=_trace_of(span, event),
            )
            cmds.append(cmd)
            spans[id(cmd)] = span
            items.append((record, event, span))
        decoded[:] = items

        def scope(cmd: ExecutePayment) -> AbstractContextManager[object]:
            # The gateway call is traced under its own message's span.
            return trace.use_span(spans[id(cmd)], end_on_exit=False)

        started = time.perf_counter()
        results = await execute_payments(
            cmds, self._uow_factory, self._processor, self._clock, self._policy, scope
        )
        elapsed = time.perf_counter() - started
        tally: Counter[ExecuteResult] = Counter()
        for (_, event, span), cmd, result in zip(items, cmds, results, strict=True):
            self._executed(event, cmd.payment_id, result, span, elapsed, tally)
        for result, count in tally.items():
            self._metrics.executions.add(count, {"result": result.value})
        return alone

    def _executed(
        self,
        event: InboundEvent,
        payment_id: uuid.UUID,
        result: ExecuteResult,
        span: Span,
        elapsed: float,
        tally: Counter[ExecuteResult] | None = None,
    ) -> None:
        span.set_attribute("payment.result", result.value)
        # Every message's duration (a batch's messages share theirs); counts per batch.
        self._metrics.execution_duration.record(elapsed, {"result": result.value})
        if tally is not None:
            tally[result] += 1
        else:
            self._metrics.executions.add(1, {"result": result.value})
        if result in _NOTABLE_EXECUTIONS and self._budget.allow(f"execution {result.value}"):
            log.info(
                "payment.initiated %s: %s",
                event.id[:80],
                result.value,
                extra={"payment_id": str(payment_id), "result": result.value},
            )

    async def _handle_in(
        self, record: ConsumerRecord[bytes, bytes], span: Span, *, counted: bool = False
    ) -> None:
        if record.topic == self._request_topic and not counted:
            # Once per delivery, before decoding: retries do not count again, poison does.
            self._metrics.requests_received.add(1)
        errors = 0
        backoff = self._backoff()
        while True:
            try:
                await self._process(record)
                return
            except PoisonMessage as exc:
                await self._park(record, exc.reason, cause="poison")
                return
            except asyncio.CancelledError:
                span.set_attribute("error.type", "cancelled")
                raise
            except Exception as exc:  # the outermost loop: log, count, keep going
                delay = backoff.next()
                if self._is_transient(exc):
                    # An outage (database, broker): wait and retry for as long as it
                    # lasts; never a dead letter, however long.
                    self._metrics.handler_retries.add(1, {"kind": "transient"})
                    span.add_event("retry", {"error.type": type(exc).__name__, "kind": "transient"})
                    log.warning(
                        "consumer: %s at %s[%d]@%d; retrying in %.1fs",
                        _error_name(exc),
                        record.topic,
                        record.partition,
                        record.offset,
                        delay,
                    )
                else:
                    errors += 1
                    self._metrics.handler_retries.add(1, {"kind": "error"})
                    span.add_event("retry", {"error.type": type(exc).__name__, "kind": "error"})
                    log.exception(
                        "consumer: handler error %d/%d at %s[%d]@%d",
                        errors,
                        MAX_HANDLER_ERRORS,
                        record.topic,
                        record.partition,
                        record.offset,
                    )
                    if errors >= MAX_HANDLER_ERRORS:
                        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                        await self._park(
                            record, f"handler error: {type(exc).__name__}", cause="handler_error"
                        )
                        return
            await asyncio.sleep(delay)

    def _backoff(self) -> Backoff:
        return Backoff(initial=self._retry_initial_s, maximum=self._retry_max_s)

    async def _park(self, record: ConsumerRecord[bytes, bytes], reason: str, *, cause: str) -> None:
        backoff = self._backoff()
        while True:
            try:
                await self._dead_letters.publish(record, reason)
                break
            except Exception as exc:
                if not (isinstance(exc, KafkaError) or self._is_transient(exc)):
                    raise
                delay = backoff.next()
                log.warning("consumer: dead-letter publish failed; retrying in %.1fs", delay)
                await asyncio.sleep(delay)
        self._metrics.messages_dead_lettered.add(1, {"topic": record.topic, "cause": cause})
        span = trace.get_current_span()
        span.set_attribute("payment.dead_lettered", cause)
        log.warning(
            "consumer: dead-lettered %s[%d]@%d: %s",
            record.topic,
            record.partition,
            record.offset,
            reason,
            extra={"cause": cause},
        )

    async def _process(self, record: ConsumerRecord[bytes, bytes]) -> None:
        event = decode_record(record)
        _tag_event(trace.get_current_span(), event)
        if record.topic == self._request_topic:
            await self._on_request(record, event)
        elif record.topic == self._initiated_topic:
            await self._on_initiated(event)
        elif self._refund_topic is not None and record.topic == self._refund_topic:
            await self._on_refund(record, event)
        else:
            raise PoisonMessage(f"unexpected topic {record.topic}")

    async def _on_request(self, record: ConsumerRecord[bytes, bytes], event: InboundEvent) -> None:
        if event.type != REQUEST_PAYMENT:
            raise PoisonMessage(f"unexpected ce_type on {record.topic}")
        data = decode_request(event.data)
        inbound = InboundRef(source=event.source, message_id=event.id)
        cmd = RequestPayment(
            inbound=inbound,
            booking_id=data.booking_id,
            amount=data.amount,
            currency=data.currency,
            payment_method=data.payment_method,
            customer_id=data.customer_id,
            saga_id=data.saga_id,
            trace=TraceHeaders(traceparent=event.traceparent, tracestate=event.tracestate),
        )
        span = trace.get_current_span()
        span.set_attribute("payment.booking_id", untrusted_attribute(data.booking_id))
        try:
            result = await request_payment(cmd, self._uow_factory, self._clock, self._settings)
        except PaymentConflict as exc:
            span.set_attribute("payment.id", str(exc.payment_id))
            await self._park(
                record, f"conflict: {exc.detail} (payment {exc.payment_id})", cause="conflict"
            )
            await self._mark_handled(inbound)
            return
        self._requested(event, data.booking_id, result, span)

    async def _on_refund(self, record: ConsumerRecord[bytes, bytes], event: InboundEvent) -> None:
        if event.type != REFUND_PAYMENT:
            raise PoisonMessage(f"unexpected ce_type on {record.topic}")
        assert self._refunds is not None  # given with the refund topic
        data = decode_refund(event.data)
        trace_headers = TraceHeaders(traceparent=event.traceparent, tracestate=event.tracestate)
        cmd = RefundPayment(
            inbound=InboundRef(source=event.source, message_id=event.id),
            booking_id=data.booking_id,
            amount=data.amount,
            reason=data.reason,
            saga_id=data.saga_id,
            trace=trace_headers,
        )
        span = trace.get_current_span()
        span.set_attribute("payment.booking_id", data.booking_id)
        result, payment_id = await self._refunds.request(cmd)
        span.set_attribute("payment.refund.result", result.value)
        self._metrics.refund_requests_handled.add(1, {"result": result.value})
        if payment_id is not None:
            span.set_attribute("payment.id", str(payment_id))
        if result is RefundResult.ACCEPTED and payment_id is not None:
            # Recorded and committed: from here a crash leaves it to the refund worker.
            settled = await self._refunds.settle(
                SettleRefunds(payment_id=payment_id, trace=trace_headers)
            )
            span.set_attribute("payment.refund.settled", [r.value for r in settled])
        if result is not RefundResult.ACCEPTED and self._budget.allow(f"refund {result.value}"):
            log.info(
                "refund request %s: %s",
                event.id,
                result.value,
                extra={"booking_id": data.booking_id, "result": result.value},
            )

    async def _on_initiated(self, event: InboundEvent) -> None:
        if event.type != PAYMENT_INITIATED:
            raise PoisonMessage("unexpected ce_type on the initiated topic")
        payment_id: uuid.UUID = decode_initiated(event.data)
        cmd = ExecutePayment(
            inbound=InboundRef(source=event.source, message_id=event.id),
            payment_id=payment_id,
            trace=TraceHeaders(traceparent=event.traceparent, tracestate=event.tracestate),
        )
        span = trace.get_current_span()
        span.set_attribute("payment.id", str(payment_id))
        started = time.perf_counter()
        result = await execute_payment(
            cmd, self._uow_factory, self._processor, self._clock, self._policy
        )
        self._executed(event, payment_id, result, span, time.perf_counter() - started)

    async def _mark_handled(self, inbound: InboundRef) -> None:
        async with self._uow_factory() as uow:
            if await uow.inbox.mark(inbound.source, inbound.message_id, self._clock.now()):
                await uow.commit()

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

    # -- offsets -----------------------------------------------------------------------

    async def _commit_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._commit_interval_s)
            await self._commit()

    async def _commit(self, only: Sequence[TopicPartition] | None = None) -> None:
        if self._consumer is None:
            return
        async with self._commit_lock:
            offsets: dict[TopicPartition, int] = {}
            for tp, progress in self._progress.items():
                # Partitions being revoked are committed by name, once, from on_revoked;
                # otherwise only partitions this member still owns.
                if (only is not None and tp not in only) or (
                    only is None and tp not in self.assigned
                ):
                    continue
                nxt = progress.committable()
                if nxt is not None:
                    offsets[tp] = nxt
            if not offsets:
                return
            try:
                failpoints.hit("before_offset_commit")
                committed = await commit_as_member(self._consumer, offsets, self._commit_timeout_s)
            except (CommitFailedError, KafkaError, TimeoutError) as exc:
                # After a rebalance the new owner re-reads from the last commit; the
                # inbox absorbs what we already handled.
                log.warning("consumer: offset commit failed (%s); will retry", type(exc).__name__)
                return
            if not committed:
                log.info("consumer: not a member of the group now; offsets left uncommitted")
                return
            failpoints.hit("after_offset_commit")
            for tp, nxt in offsets.items():
                self._progress[tp].committed = nxt

    async def _drain(self, partitions: Sequence[TopicPartition]) -> None:
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
            for tp, record in kept:
                await self._slots.acquire()
                self._dispatch(tp, record)

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        # First, so that the run loop dispatches nothing more from these partitions.
        self.assigned -= revoked
        # Held requests of these partitions are the next owner's (it re-reads them from
        # the last commit): dispatched here later, they could move a re-assigned
        # partition's offset past records not read again yet.
        self._held = [(tp, r) for tp, r in self._held if tp not in revoked]
        await self._drain(list(revoked))
        await self._commit(list(revoked))
        for tp in revoked:
            self._progress.pop(tp, None)
            self._tasks.pop(tp, None)
        if revoked:
            log.info("consumer: partitions revoked: %s", _names(revoked))

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self.assigned |= assigned
        if assigned:
            self.joined.set()
        if assigned:
            log.info("consumer: partitions assigned: %s", _names(assigned))


async def commit_as_member(
    consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int], timeout_s: float
) -> bool:
    """Commit `offsets` only while this consumer holds a generation of its group.

    A consumer that lost its membership (its session expired while the broker was away,
    or the broker forgot it) has generation -1, and a broker accepts a commit without a
    generation into a group that has no members. Those offsets were read from the log as
    it was before: if the broker lost that log (a broker without durable storage
    restarted, a topic re-created), they point past records nobody has read yet, and the
    group would skip them. So a consumer without a generation does not commit (returns
    False): the partitions' next owner re-reads from the last commit and the inbox absorbs
    the redelivery. The check is made once the coordinator is known, right before the
    request goes out; a commit that waits longer than `timeout_s` (no coordinator
    reachable) gives up with TimeoutError and is retried later, checked again.

    aiokafka keeps the generation private (`_coordinator.generation`); without it this
    falls back to a plain commit.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    async with asyncio.timeout(timeout_s):
        if coordinator is not None:
            await coordinator.ensure_coordinator_known()
            generation = getattr(coordinator, "generation", 0)
            if isinstance(generation, int) and generation < 0:
                return False
        await consumer.commit(offsets)
    return True


def _tag_event(span: Span, event: InboundEvent) -> None:
    """The message's CloudEvents attributes on its span: the sender's, so bounded and masked."""
    event_id = untrusted_attribute(event.id)
    span.set_attribute("messaging.message.id", event_id)
    span.set_attribute("cloudevents.event_id", event_id)
    span.set_attribute("cloudevents.event_source", untrusted_attribute(event.source))
    span.set_attribute("cloudevents.event_type", untrusted_attribute(event.type))


def _trace_of(span: Span, event: InboundEvent) -> TraceHeaders:
    """The trace context outbound rows of this message carry: its CONSUMER span's.

    (The single-message path stamps rows with the span in force when they are written;
    a batch writes many messages' rows outside any one span, so each carries its own.)
    Without a valid span (tracing off), the sender's context as received.
    """
    if span.get_span_context().is_valid:
        carrier: dict[str, str] = {}
        _W3C.inject(carrier, context=trace.set_span_in_context(span))
        if "traceparent" in carrier:
            return TraceHeaders(
                traceparent=carrier["traceparent"], tracestate=carrier.get("tracestate")
            )
    return TraceHeaders(traceparent=event.traceparent, tracestate=event.tracestate)


def _error_name(exc: BaseException) -> str:
    """The error's type, with its SQLSTATE when it has one (`ReadOnlySqlTransaction/25006`)."""
    state = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__}/{state}" if isinstance(state, str) else type(exc).__name__


def _names(tps: set[TopicPartition]) -> str:
    return ", ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in tps))


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: KafkaInboxConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._owner.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._owner.on_assigned(set(assigned))
