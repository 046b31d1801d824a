"""The outbox relay: publishes committed outbox rows to Kafka in order, marking them after acks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from payment.adapters.kafka.cloudevents import encode_outbound
from payment.adapters.kafka.key_backoff import KeyBackoff
from payment.adapters.kafka.topics import Topics
from payment.adapters.observability.log_budget import UNLIMITED, LogBudget
from payment.adapters.observability.span_values import untrusted_attribute
from payment.adapters.observability.telemetry import context_from_trace
from payment.application import failpoints
from payment.application.ports import Clock, OutboxRecord, RecordQueue, UnitOfWorkFactory
from payment.application.retry import Backoff

log = logging.getLogger(__name__)

_T = TypeVar("_T")

WaitForWork = Callable[[float], Awaitable[None]]
Leadership = Callable[[], AbstractAsyncContextManager[object]]

_FIRST_BACKOFF = 0.1
# A record the producer (max_request_size) or the topic (max.message.bytes) refuses.
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)


class KafkaOutboxRelay:
    """Publishes the outbox: at least once, in stream order, the same `ce_id` every time.

    Each pass reads up to `batch_size` pending rows, sends them and marks published only
    the rows the broker acknowledged. Rows with the same key (one payment) are sent one
    after the other, each only after the previous one was acknowledged; different keys
    are sent concurrently. So a failed send never lets a later event of its payment reach
    the broker before it: the rest of that key waits. A crash between ack and mark
    re-publishes those rows with the same `ce_id`, which consumers deduplicate.

    A key whose send failed backs off on its own (`KeyBackoff`: full jitter, up to
    `max_backoff`): its rows are left out of the passes until it is due again, while the
    other keys' rows go out as soon as they are committed. One bad row (a topic the broker
    refuses, a record it cannot take) slows its own payment only, not the whole relay.

    That also makes the relay safe, though wasteful, when two instances briefly publish at
    once: each sends a payment's events in order, so the first copy of every event on the
    partition still comes in stream order. `leadership` only avoids that waste:

    - `leadership` is a callable returning an async context manager. The relay enters it
      before publishing and exits it when it stops, after an error, and at the end of each
      `leadership_term` seconds (so a lock lost with its connection is noticed, and
      re-entering fails or waits). Entering waits until this instance is the leader and
      must clean up if cancelled. `None`: always publish (a single instance, tests).
    - `wait_for_work(timeout)` returns when new rows may have been committed, or after
      `timeout` seconds (the polling fallback). A notification that arrived while the
      relay was publishing should make the next call return at once; a spurious return
      costs one query. Default: `asyncio.sleep`, i.e. polling every `poll_interval`.

    Broker errors are logged and retried with backoff per key; database errors and anything
    else end the current leadership term, are logged and retried: `run` never raises.

    Each send is a PRODUCER span continuing the trace stored with the row (the context in
    force when the row was written). The record carries that stored `traceparent` as it
    is, so every re-publication of a row sends the same headers.
    """

    def __init__(
        self,
        producer: RecordQueue,
        uow_factory: UnitOfWorkFactory,
        topics: Topics,
        clock: Clock,
        *,
        source: str = "payment-service",
        batch_size: int = 500,
        wait_for_work: WaitForWork | None = None,
        poll_interval: float = 1.0,
        leadership: Leadership | None = None,
        leadership_term: float = 60.0,
        ack_timeout: float = 30.0,
        max_backoff: float = 10.0,
        tracer: Tracer | None = None,
        log_budget: LogBudget = UNLIMITED,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._producer = producer
        self._uow_factory = uow_factory
        self._topic_for = topics.outbound
        self._clock = clock
        self._source = source
        self._batch_size = batch_size
        self._wait_for_work: WaitForWork = wait_for_work or _sleep
        self._poll_interval = poll_interval
        self._leadership = leadership
        self._leadership_term = leadership_term
        self._ack_timeout = ack_timeout
        self._max_backoff = max_backoff
        self._keys = KeyBackoff(initial=min(_FIRST_BACKOFF, max_backoff), maximum=max_backoff)
        self._tracer = tracer or trace.get_tracer(__name__)
        self._budget = log_budget
        self._pass_lock = asyncio.Lock()
        # Keys whose row a topic refused as too large: the producer batches a partition's
        # records together, so such a row fails every row batched with it. These are sent
        # alone until they go through, and the others no longer wait on them.
        self._send_alone: set[str] = set()
        self._stopping = False
        self._leading = False
        # True only while `run` waits (for leadership, for work, out a backoff): the
        # points where `stop` may cancel it without cutting a batch in half.
        self._interruptible = False
        self._body: asyncio.Task[None] | None = None
        self.published = 0
        self.send_failures = 0
        self.errors = 0

    @property
    def leading(self) -> bool:
        """True while `run` holds leadership (or needs none) and publishes."""
        return self._leading

    async def run(self) -> None:
        """Publish until `stop()` (returns normally) or cancellation; never raises otherwise."""
        body = asyncio.create_task(self._run_body(), name="outbox-relay")
        self._body = body
        try:
            await asyncio.wait([body])
        except asyncio.CancelledError:
            body.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await body
            raise
        finally:
            self._body = None
        if not body.cancelled():
            body.result()

    def stop(self) -> None:
        """Make `run` return: at once if it is waiting, else after its current batch."""
        self._stopping = True
        if self._interruptible and self._body is not None:
            self._body.cancel()

    async def flush(self, grace_period: float = 10.0) -> int:
        """Publish until no row is pending, for a graceful shutdown; returns how many.

        Call it while `run` is still running (then `stop()`), or after it ended. Gives up
        after `grace_period` seconds, or on a database error: what is left stays pending
        for the next leader. With `leadership`: while `run` is running but does not lead,
        another instance does and will publish the rows, so this returns 0 at once; after
        `run` ended (or without it) it tries to lead for the grace period.
        """
        before = self.published
        try:
            async with asyncio.timeout(grace_period):
                if self._leading or self._leadership is None:
                    await self._drain()
                elif self._body is None:
                    async with self._leadership():
                        await self._drain()
        except TimeoutError:
            log.warning("outbox relay: flush gave up after %.1fs", grace_period)
        except Exception:  # shutdown must go on; the rows stay pending for the next leader
            log.exception("outbox relay: flush failed")
        return self.published - before

    async def publish_pending(self) -> tuple[int, int]:
        """One pass: send up to `batch_size` pending rows, mark the acknowledged ones.

        Returns (rows read, rows not published because a send failed). Broker errors are
        counted, not raised; database errors propagate.
        """
        async with self._pass_lock:
            async with self._uow_factory() as uow:
                rows = await uow.outbox.pending(self._batch_size, self._keys.waiting())
            by_key: dict[str, list[OutboxRecord]] = {}
            for row in sorted(rows, key=lambda r: r.position):
                by_key.setdefault(row.message.key, []).append(row)
            if len(rows) < self._batch_size:
                # Every pending row was read: a failing key due now without one has
                # nothing left to send.
                self._keys.forget_due(set(by_key))
            if not rows:
                return 0, 0
            # Rounds: the first row of every key, then the second of every key whose first
            # was acknowledged, and so on. A key stops at its first failure and backs off.
            acked: list[int] = []
            live = list(by_key.values())
            depth = 0
            while live:
                sent = await self._send_round([chain[depth] for chain in live])
                for chain, ok in zip(live, sent, strict=True):
                    key = chain[depth].message.key
                    if ok:
                        acked.append(chain[depth].position)
                        if depth == 0:
                            self._keys.succeeded(key)
                    else:
                        self._keys.failed(key)
                depth += 1
                live = [
                    chain for chain, ok in zip(live, sent, strict=True) if ok and len(chain) > depth
                ]
            acked.sort()
            if acked:
                async with self._uow_factory() as uow:
                    await uow.outbox.mark_published(acked, self._clock.now())
                    await uow.commit()
                failpoints.hit("after_mark_published")
                self.published += len(acked)
            return len(rows), len(rows) - len(acked)

    async def _send_round(self, rows: Sequence[OutboxRecord]) -> list[bool]:
        """Send one row of each of several keys; which of them were acknowledged.

        Rows of keys a topic refused as too large go last, each alone (see `_send_alone`).
        """
        sent: dict[int, bool] = {}
        together = [r for r in rows if r.message.key not in self._send_alone]
        for row, ok in zip(together, await self._send_together(together), strict=True):
            sent[row.position] = ok
        for row in rows:
            if row.message.key in self._send_alone:
                (sent[row.position],) = await self._send_together([row], alone=True)
        return [sent[row.position] for row in rows]

    async def _send_together(
        self, rows: Sequence[OutboxRecord], *, alone: bool = False
    ) -> list[bool]:
        """Send rows at once; which of them were acknowledged.

        Every row is queued with the producer first (one PRODUCER span each, ended at its
        acknowledgement), then the acknowledgements are awaited together, within
        `ack_timeout`: no task or timer per row.
        """
        sending: list[tuple[OutboxRecord, Span, asyncio.Future[object]] | None] = []
        for row in rows:
            message = row.message
            try:
                record = encode_outbound(message, source=self._source, topic_for=self._topic_for)
            except KeyError:
                log.error("outbox relay: no topic for type %s (row %d)", message.type, row.position)
                sending.append(None)
                continue
            except Exception:  # a row that cannot be encoded holds back its key only
                log.exception("outbox relay: cannot encode row %d (%s)", row.position, message.type)
                sending.append(None)
                continue
            # A rejection's key is the sender's booking id, unvalidated: bounded and masked.
            key_attribute, key_value = (
                ("payment.id", message.key)
                if message.subject is not None
                else ("payment.booking_id", untrusted_attribute(message.key))
            )
            span = self._tracer.start_span(
                f"publish {record.topic}",
                context=context_from_trace(message.trace),
                kind=SpanKind.PRODUCER,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.operation.type": "send",
                    "messaging.destination.name": record.topic,
                    "messaging.message.id": str(message.event_id),
                    "cloudevents.event_id": str(message.event_id),
                    "cloudevents.event_type": message.type,
                    key_attribute: key_value,
                    "payment.outbox.position": row.position,
                },
                record_exception=False,
                set_status_on_exception=False,
            )
            failpoints.hit("before_publish")
            try:
                ack = await self._producer.send(
                    record.topic, value=record.value, key=record.key, headers=record.headers
                )
            except Exception as exc:  # refused before queueing: the row's ack is the error
                ack = asyncio.get_running_loop().create_future()
                ack.set_exception(exc)
            sending.append((row, span, ack))
        acks = [item[2] for item in sending if item is not None]
        if acks:
            await asyncio.wait(acks, timeout=self._ack_timeout)
        results: list[bool] = []
        for item in sending:
            if item is None:
                results.append(False)
                continue
            row, span, ack = item
            error: BaseException | None
            if not ack.done():
                ack.cancel()
                error = TimeoutError()
            else:
                error = None if ack.cancelled() else ack.exception()
                if ack.cancelled():
                    error = TimeoutError()
            results.append(self._acknowledged(row, span, error, alone=alone))
        return results

    def _acknowledged(
        self, row: OutboxRecord, span: Span, error: BaseException | None, *, alone: bool
    ) -> bool:
        """End the row's span and log its fate; True if the broker acknowledged it."""
        message = row.message
        try:
            if error is not None:
                # Whatever the error, only this row's key is held back: the rows of the
                # round that were acknowledged are still marked, and every span ends.
                self.send_failures += 1
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
                if isinstance(error, _TOO_LARGE) and not alone:
                    # Maybe only batched with a row that is: it will be sent alone.
                    self._send_alone.add(message.key)
                    log.warning(
                        "outbox relay: row %d (%s, key %s) was refused in a batch too large"
                        " for its topic; sending it alone",
                        row.position,
                        message.type,
                        message.key,
                    )
                    return False
                if isinstance(error, _TOO_LARGE):
                    # Not an outage: it fails the same way until the limit is raised.
                    log.error(
                        "outbox relay: row %d (%s, key %s) is larger than the producer or the "
                        "topic accepts (%s): it stays unpublished and holds back the later "
                        "events of key %s only; raise the topic's max.message.bytes (and "
                        "the producer's max_request_size) to publish it",
                        row.position,
                        message.type,
                        message.key,
                        type(error).__name__,
                        message.key,
                    )
                    return False
                broker_trouble = isinstance(error, (KafkaError, TimeoutError))
                log.log(
                    logging.WARNING if broker_trouble else logging.ERROR,
                    "outbox relay: send of row %d (%s, key %s) failed: %s",
                    row.position,
                    message.type,
                    message.key,
                    type(error).__name__,
                    exc_info=None if broker_trouble else error,
                )
                return False
            self._send_alone.discard(message.key)
            if self._budget.allow(f"published {message.type}"):
                with trace.use_span(span, end_on_exit=False):
                    log.info(
                        "published %s",
                        message.type,
                        extra={
                            "payment_id"
                            if message.subject is not None
                            else "booking_id": message.key,
                            "event_type": message.type,
                            "ce_id": str(message.event_id),
                            "sequence": message.sequence,
                        },
                    )
        finally:
            span.end()
        failpoints.hit("after_publish")
        return True

    async def _drain(self) -> None:
        while True:
            fetched, failed = await self.publish_pending()
            if not fetched and not self._keys:
                return
            if fetched == failed:  # nothing went out: wait for a failing key to come due
                await asyncio.sleep(self._until_a_key_is_due(self._poll_interval))

    def _until_a_key_is_due(self, longest: float) -> float:
        """How long to wait when no row went out: until the earliest failing key is due,
        at most `longest`, and not less than the first back-off (a failing broker must
        not turn into a pass per key)."""
        due = self._keys.next_due_in()
        if due is None:
            return longest
        return max(min(_FIRST_BACKOFF, self._max_backoff), min(due, longest))

    async def _run_body(self) -> None:
        backoff = Backoff(initial=min(_FIRST_BACKOFF, self._max_backoff), maximum=self._max_backoff)
        renewing = False
        while not self._stopping:
            try:
                async with contextlib.AsyncExitStack() as stack:
                    if self._leadership is not None:
                        await self._interruptibly(stack.enter_async_context(self._leadership()))
                        if not renewing:
                            log.info("outbox relay: leading")
                    self._leading = True
                    try:
                        await self._serve()
                    finally:
                        self._leading = False
                backoff.reset()
                renewing = True
            except Exception:  # the relay's outermost loop: log, count, keep going
                self.errors += 1
                renewing = False
                delay = backoff.next()
                log.exception("outbox relay: error; retrying in %.1fs", delay)
                await self._interruptibly(asyncio.sleep(delay))

    async def _serve(self) -> None:
        """Publish while leading: until stopped, or the leadership term ends."""
        term_ends = time.monotonic() + self._leadership_term
        while not self._stopping:
            fetched, failed = await self.publish_pending()
            if failed and fetched == failed:
                # Nothing went out: new rows, or the first failing key coming due.
                await self._interruptibly(
                    self._wait_for_work(self._until_a_key_is_due(self._poll_interval))
                )
            else:
                # A short pass read everything committed before it: with notifications, a
                # row committed since has announced itself (the wait returns at once), so
                # asking again now would mostly find nothing. Polling must ask again.
                notified = self._wait_for_work is not _sleep
                if not fetched or (notified and fetched < self._batch_size):
                    timeout = self._poll_interval
                    if self._keys:
                        timeout = self._until_a_key_is_due(timeout)
                    await self._interruptibly(self._wait_for_work(timeout))
            # Checked under load too, so a lost lock is noticed within a term regardless.
            if self._leadership is not None and time.monotonic() >= term_ends:
                return

    async def _interruptibly(self, awaitable: Awaitable[_T]) -> _T:
        self._interruptible = True
        try:
            return await awaitable
        finally:
            self._interruptible = False


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)
