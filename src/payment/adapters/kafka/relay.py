"""The outbox relay: publishes committed outbox rows to Kafka in order, marking them after acks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import TypeVar

from opentelemetry import trace
from opentelemetry.trace import Tracer

from payment.adapters.kafka.key_backoff import KeyBackoff
from payment.adapters.kafka.relay_marks import Acknowledged, BackgroundMarks
from payment.adapters.kafka.relay_sending import RowSender
from payment.adapters.kafka.topics import Topics
from payment.adapters.observability.log_budget import UNLIMITED, LogBudget
from payment.application import failpoints
from payment.application.ports import Clock, OutboxRecord, RecordQueue, UnitOfWorkFactory
from payment.application.retry import Backoff

log = logging.getLogger(__name__)

_T = TypeVar("_T")

WaitForWork = Callable[[float], Awaitable[None]]
Leadership = Callable[[], AbstractAsyncContextManager[object]]

_FIRST_BACKOFF = 0.1
# A pass waits for the background marks once they are this many passes behind.
_MARKS_BEHIND = 2
# How long leaving (a stop, the end of a term) waits for the last marks.
_SETTLE_WITHIN = 5.0


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
        key_backoff: KeyBackoff | None = None,
        tracer: Tracer | None = None,
        log_budget: LogBudget = UNLIMITED,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._uow_factory = uow_factory
        self._clock = clock
        self._batch_size = batch_size
        self._wait_for_work: WaitForWork = wait_for_work or _sleep
        self._poll_interval = poll_interval
        self._leadership = leadership
        self._leadership_term = leadership_term
        self._max_backoff = max_backoff
        if key_backoff is None:  # (not `or`: an empty KeyBackoff is falsy)
            key_backoff = KeyBackoff(initial=min(_FIRST_BACKOFF, max_backoff), maximum=max_backoff)
        self._keys = key_backoff
        self._sender = RowSender(
            producer,
            topics,
            source=source,
            ack_timeout=ack_timeout,
            tracer=tracer or trace.get_tracer(__name__),
            log_budget=log_budget,
        )
        self._pass_lock = asyncio.Lock()
        # What `run`'s passes published, marked beside the next passes.
        self._marks = BackgroundMarks(self._mark_batches, log_budget)
        self._stopping = False
        self._leading = False
        # True only while `run` waits (for leadership, for work, out a backoff): the
        # points where `stop` may cancel it without cutting a batch in half.
        self._interruptible = False
        self._body: asyncio.Task[None] | None = None
        self.published = 0
        self.errors = 0

    @property
    def send_failures(self) -> int:
        """Rows whose send failed (or that could not be encoded), since the start."""
        return self._sender.failures

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

    async def publish_pending(self, *, mark_in_background: bool = False) -> tuple[int, int]:
        """One pass: send up to `batch_size` pending rows, mark the acknowledged ones.

        Returns (rows read, rows not published because a send failed). Broker errors are
        counted, not raised; database errors propagate. `mark_in_background`: the pass
        ends at the acknowledgements, and the marks commit beside the next passes
        (`BackgroundMarks`; `run` does this, and settles them when it stops leading).
        """
        async with self._pass_lock:
            if len(self._marks) > _MARKS_BEHIND * self._batch_size:
                await self._marks.settle()  # the marks fell behind: they first
            self._marks.start()  # again, if the last one failed
            async with self._uow_factory() as uow:
                rows = await uow.outbox.pending(
                    self._batch_size, self._keys.waiting(), self._marks.positions()
                )
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
                sent = await self._sender.send_round([chain[depth] for chain in live])
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
            if acked and mark_in_background:
                self._marks.add(acked, self._clock.now())
            elif acked:
                await self._mark(acked, self._clock.now())
            return len(rows), len(rows) - len(acked)

    async def _mark(self, positions: list[int], at: datetime) -> None:
        await self._mark_batches([Acknowledged(positions, at)])

    async def _mark_batches(self, batches: Sequence[Acknowledged]) -> None:
        """Mark acknowledged batches published, in one transaction."""
        async with self._uow_factory() as uow:
            for batch in batches:
                await uow.outbox.mark_published(batch.positions, batch.at)
            await uow.commit()
        failpoints.hit("after_mark_published")
        self.published += sum(len(batch.positions) for batch in batches)

    async def _drain(self) -> None:
        while True:
            fetched, failed = await self.publish_pending()
            if not fetched and not self._keys:
                await self._marks.settle()  # a retry `publish_pending` may have started
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
        try:
            while not self._stopping:
                fetched, failed = await self.publish_pending(mark_in_background=True)
                if failed and fetched == failed:
                    # Nothing went out: new rows, or the first failing key coming due.
                    await self._interruptibly(
                        self._wait_for_work(self._until_a_key_is_due(self._poll_interval))
                    )
                else:
                    # A short pass read everything committed before it: with notifications,
                    # a row committed since has announced itself (the wait returns at once),
                    # so asking again now would mostly find nothing. Polling must ask again.
                    notified = self._wait_for_work is not _sleep
                    if not fetched or (notified and fetched < self._batch_size):
                        timeout = self._poll_interval
                        if self._keys:
                            timeout = self._until_a_key_is_due(timeout)
                        await self._interruptibly(self._wait_for_work(timeout))
                # Checked under load too, so a lost lock is noticed within a term regardless.
                if self._leadership is not None and time.monotonic() >= term_ends:
                    return
        finally:
            await self._mark_before_leaving()

    async def _mark_before_leaving(self) -> None:
        """Settle the background marks: another leader would publish those rows again.
        If the database fails now, they stay queued for this relay's next term."""
        try:
            async with asyncio.timeout(_SETTLE_WITHIN):
                settled = await self._marks.settle()
        except TimeoutError:
            settled = False
        if not settled:
            log.warning("outbox relay: %d published rows left unmarked", len(self._marks))

    async def _interruptibly(self, awaitable: Awaitable[_T]) -> _T:
        self._interruptible = True
        try:
            return await awaitable
        finally:
            self._interruptible = False


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)
