"""KafkaOutboxRelay on a fake sender: ordering per key, mark-after-ack, failures, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from aiokafka.errors import KafkaConnectionError
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer

from payment.adapters.kafka import relay as relay_module
from payment.adapters.kafka.key_backoff import KeyBackoff
from payment.adapters.kafka.relay import KafkaOutboxRelay
from payment.adapters.kafka.topics import Topics
from payment.adapters.memory import MemoryUnitOfWork, MemoryUnitOfWorkFactory
from payment.adapters.observability.log_budget import LogBudget
from payment.adapters.observability.telemetry import PropagatingTracer
from payment.application.commands import TraceHeaders
from payment.application.messages import OutboundMessage, OutboundType
from support.record_senders import FakeRecordQueue, Outgoing
from support.waiting import eventually

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


class FixedClock:
    def now(self) -> datetime:
        return NOW


class Sent:
    def __init__(self, topic: str, key: bytes, headers: dict[str, bytes]) -> None:
        self.topic = topic
        self.key = key.decode()
        self.ce_id = headers["ce_id"].decode()
        self.sequence = int(headers["ce_sequence"])


class FakeSender(FakeRecordQueue):
    """Acknowledges every send unless `fails(key, sequence)` says the broker refused it.

    `fails` may also name the error the acknowledgement fails with; `refuses(key, sequence)`
    an error `send` raises before anything is queued.
    """

    def __init__(
        self,
        fails: Callable[[str, int], bool | Exception] = lambda key, seq: False,
        refuses: Callable[[str, int], Exception | None] = lambda key, seq: None,
    ) -> None:
        self.fails = fails
        self.refuses = refuses
        self.sent: list[Sent] = []
        self.attempts = 0

    async def deliver(self, record: Outgoing) -> object:
        self.attempts += 1
        await asyncio.sleep(0)  # let concurrent chains interleave, as real acks do
        assert record.key is not None
        sent = Sent(record.topic, record.key, {n: v for n, v in record.headers if v is not None})
        failure = self.fails(sent.key, sent.sequence)
        if isinstance(failure, Exception):
            raise failure
        if failure:
            raise KafkaConnectionError("broker away")
        self.sent.append(sent)
        return None

    def queue(self, record: Outgoing) -> None:
        assert record.key is not None
        sequence = int(dict(record.headers)["ce_sequence"] or b"0")
        refused = self.refuses(record.key.decode(), sequence)
        if refused is not None:
            raise refused


def message(key: str, sequence: int, kind: OutboundType = "payment.initiated") -> OutboundMessage:
    return OutboundMessage(
        event_id=uuid.uuid4(),
        type=kind,
        key=key,
        subject=key,
        sequence=sequence,
        time=NOW,
        data=b"{}",
    )


async def add(uow_factory: MemoryUnitOfWorkFactory, *messages: OutboundMessage) -> None:
    async with uow_factory() as uow:
        await uow.outbox.add(messages)
        await uow.commit()


def unpublished(uow_factory: MemoryUnitOfWorkFactory) -> list[int]:
    return [r.position for r in uow_factory.db.outbox if r.published_at is None]


class KeyClock:
    """The clock of the relay's per-key backoff: it moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def stepped_backoff(clock: KeyClock) -> KeyBackoff:
    """A failing key waits 10 ms of `clock`'s time before it is tried again."""
    return KeyBackoff(initial=0.01, maximum=0.01, clock=clock, rng=lambda: 1.0)


def relay(
    sender: FakeSender, uow_factory: Callable[[], MemoryUnitOfWork], **options: object
) -> KafkaOutboxRelay:
    return KafkaOutboxRelay(
        sender,
        uow_factory,
        Topics(),
        FixedClock(),
        poll_interval=0.01,
        max_backoff=0.01,
        **options,  # type: ignore[arg-type]
    )


async def test_publishes_every_row_in_position_order_per_key_and_marks_it() -> None:
    uows = MemoryUnitOfWorkFactory()
    await add(uows, message("a", 1), message("b", 1), message("a", 2, "payment.completed"))
    sender = FakeSender()
    assert await relay(sender, uows).publish_pending() == (3, 0)
    assert [(s.key, s.sequence) for s in sender.sent if s.key == "a"] == [("a", 1), ("a", 2)]
    assert {s.topic for s in sender.sent} == {"payment.initiated", "payment.completed"}
    assert unpublished(uows) == []
    assert all(r.published_at == NOW for r in uows.db.outbox)


async def test_a_failed_send_holds_back_the_rest_of_its_key_only() -> None:
    uows = MemoryUnitOfWorkFactory()
    await add(uows, message("a", 1), message("b", 1), message("a", 2), message("b", 2))
    await add(uows, message("a", 3))
    failures = {("a", 2)}

    def fails(key: str, seq: int) -> bool:
        return (key, seq) in failures

    sender = FakeSender(fails)
    keys_clock = KeyClock()
    r = relay(sender, uows, key_backoff=stepped_backoff(keys_clock))
    assert await r.publish_pending() == (5, 2)
    # a2 failed, so a3 was never even tried: the broker can never hold a3 before a2.
    assert sorted((s.key, s.sequence) for s in sender.sent) == [("a", 1), ("b", 1), ("b", 2)]
    assert sender.attempts == 4
    assert unpublished(uows) == [3, 5]
    assert r.send_failures == 1

    failures.clear()
    # Key a backs off on its own (10 ms of its clock): once due, its rows go in order.
    assert await r.publish_pending() == (0, 0)
    keys_clock.now += 0.02
    assert await r.publish_pending() == (2, 0)
    assert [(s.key, s.sequence) for s in sender.sent if s.key == "a"] == [
        ("a", 1),
        ("a", 2),
        ("a", 3),
    ]
    assert unpublished(uows) == []
    assert r.published == 5


def recording_tracer() -> tuple[Tracer, InMemorySpanExporter]:
    """An SDK tracer whose ended spans land in the exporter returned with it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


async def test_an_error_that_is_not_the_brokers_holds_back_its_key_only() -> None:
    tracer, exporter = recording_tracer()
    uows = MemoryUnitOfWorkFactory()
    await add(uows, message("a", 1), message("b", 1), message("c", 1))
    await add(uows, message("a", 2), message("b", 2), message("c", 2))
    raising = {("a", 2)}
    failing = {("b", 1)}
    sender = FakeSender(
        fails=lambda key, seq: (
            RuntimeError("a bug in the ack path") if (key, seq) in failing else False
        ),
        refuses=lambda key, seq: ValueError("cannot queue") if (key, seq) in raising else None,
    )
    keys_clock = KeyClock()
    r = relay(sender, uows, tracer=tracer, key_backoff=stepped_backoff(keys_clock))

    # No exception escapes the pass: what was acknowledged is marked, not sent again later.
    assert await r.publish_pending() == (6, 3)
    assert sorted((s.key, s.sequence) for s in sender.sent) == [("a", 1), ("c", 1), ("c", 2)]
    assert unpublished(uows) == [2, 4, 5]
    assert r.send_failures == 2
    # One span per attempt, and every one of them ended (exported), the failures marked.
    spans = exporter.get_finished_spans()
    assert len(spans) == 5
    assert sorted(s.status.status_code.name for s in spans) == ["ERROR", "ERROR"] + ["UNSET"] * 3

    raising.clear()
    failing.clear()
    assert await r.publish_pending() == (0, 0)  # keys a and b back off on their own
    keys_clock.now += 0.02
    assert await r.publish_pending() == (3, 0)
    assert unpublished(uows) == []
    for key in ("a", "b"):
        assert [s.sequence for s in sender.sent if s.key == key] == [1, 2]


async def test_nothing_is_marked_when_the_broker_is_down() -> None:
    uows = MemoryUnitOfWorkFactory()
    await add(uows, message("a", 1), message("b", 1))
    r = relay(FakeSender(lambda key, seq: True), uows)
    assert await r.publish_pending() == (2, 2)
    assert unpublished(uows) == [1, 2]
    assert r.published == 0


async def test_a_republished_row_keeps_its_ce_id() -> None:
    uows = MemoryUnitOfWorkFactory()
    await add(uows, message("a", 1))
    sender = FakeSender()
    await relay(sender, uows).publish_pending()
    # A crash between the ack and the mark: the row is still pending.
    uows.db.outbox = [msgspec.structs.replace(r, published_at=None) for r in uows.db.outbox]
    await relay(sender, uows).publish_pending()
    assert len(sender.sent) == 2
    assert sender.sent[0].ce_id == sender.sent[1].ce_id == str(uows.db.outbox[0].message.event_id)


async def test_run_keeps_going_through_broker_errors_and_stops_on_request() -> None:
    uows = MemoryUnitOfWorkFactory()
    await add(uows, *(message(f"k{i}", 1) for i in range(10)))
    down = True
    sender = FakeSender(lambda key, seq: down)
    r = relay(sender, uows)
    task = asyncio.create_task(r.run())
    await eventually(lambda: r.send_failures >= 20)
    assert unpublished(uows) == list(range(1, 11))
    down = False
    await eventually(lambda: not unpublished(uows))
    r.stop()
    await asyncio.wait_for(task, 1)
    assert r.published == 10


class FlakyUnitsOfWork(MemoryUnitOfWorkFactory):
    """The database refuses the first `failures` units of work."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def __call__(self) -> MemoryUnitOfWork:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("database away")
        return super().__call__()


async def test_run_survives_database_errors() -> None:
    uows = FlakyUnitsOfWork(failures=0)
    await add(uows, message("a", 1))
    uows.failures = 3
    r = relay(FakeSender(), uows)
    task = asyncio.create_task(r.run())
    await eventually(lambda: not unpublished(uows))
    r.stop()
    await asyncio.wait_for(task, 1)
    assert r.errors == 3


async def test_run_wakes_up_when_told_and_stop_interrupts_the_wait() -> None:
    uows = MemoryUnitOfWorkFactory()
    wake = asyncio.Event()
    waiting = asyncio.Event()

    async def wait_for_work(seconds: float) -> None:
        assert seconds == 3600
        waiting.set()
        await wake.wait()
        wake.clear()

    sender = FakeSender()
    r = KafkaOutboxRelay(
        sender, uows, Topics(), FixedClock(), wait_for_work=wait_for_work, poll_interval=3600
    )
    task = asyncio.create_task(r.run())
    # Its first pass found nothing and it waits (not a sleep: a slow machine may take
    # longer to get there, and a row added before that pass would rightly go out).
    await asyncio.wait_for(waiting.wait(), 5)
    await add(uows, message("a", 1))
    await asyncio.sleep(0.05)
    assert sender.sent == []  # no polling: only the wake-up publishes
    wake.set()
    await eventually(lambda: len(sender.sent) == 1)
    r.stop()
    await asyncio.wait_for(task, 5)


class LockLeadership:
    """One leader at a time among the relays sharing this object (a stand-in for the lock)."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.terms = 0

    def __call__(self) -> AbstractAsyncContextManager[object]:
        return self._lead()

    @asynccontextmanager
    async def _lead(self) -> AsyncIterator[None]:
        async with self.lock:
            self.terms += 1
            yield None


class MarksWaitUntilTold(MemoryUnitOfWorkFactory):
    """Marks wait for `go` (reads do not): a mark still under way while the relay goes on."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()

    def __call__(self) -> MemoryUnitOfWork:
        uow = super().__call__()
        mark = uow.outbox.mark_published

        async def held(positions: Any, at: Any) -> None:
            await self.go.wait()
            await mark(positions, at)

        uow.outbox.mark_published = held  # type: ignore[method-assign]
        return uow


class MarksFail(MemoryUnitOfWorkFactory):
    """The first `failures` marks fail (reads do not)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def __call__(self) -> MemoryUnitOfWork:
        uow = super().__call__()
        mark = uow.outbox.mark_published

        async def failing(positions: Any, at: Any) -> None:
            if self.failures:
                self.failures -= 1
                raise ConnectionError("database away")
            await mark(positions, at)

        uow.outbox.mark_published = failing  # type: ignore[method-assign]
        return uow


async def test_a_pass_can_leave_its_marks_to_a_task_while_the_next_passes_go_on() -> None:
    # What `run` does: a pass ends at the acknowledgements; while its marks are under way
    # the next pass leaves those rows out (not sent twice), and sends the rows after them.
    uows = MarksWaitUntilTold()
    await add(uows, message("a", 1), message("b", 1))
    sender = FakeSender()
    r = relay(sender, uows)
    assert await r.publish_pending(mark_in_background=True) == (2, 0)
    await add(uows, message("a", 2), message("c", 1))
    assert await r.publish_pending(mark_in_background=True) == (2, 0)  # a 2 and c 1
    assert (unpublished(uows), r.published) == ([1, 2, 3, 4], 0)
    assert await r.publish_pending() == (0, 0)
    uows.go.set()
    await eventually(lambda: not unpublished(uows))
    assert r.published == 4
    assert [(s.key, s.sequence) for s in sender.sent] == [("a", 1), ("b", 1), ("a", 2), ("c", 1)]


async def test_a_background_mark_that_failed_is_tried_again_and_nothing_is_sent_twice() -> None:
    uows = FlakyUnitsOfWork(failures=0)
    await add(uows, message("a", 1))
    sender = FakeSender()
    r = relay(sender, uows)
    await r.publish_pending(mark_in_background=True)
    uows.failures = 1  # the mark's unit of work
    await asyncio.sleep(0.01)
    assert unpublished(uows) == [1]
    assert await r.publish_pending() == (0, 0)  # tries the mark again; leaves row 1 out
    await eventually(lambda: not unpublished(uows))
    assert len(sender.sent) == 1


async def test_marks_that_fell_two_passes_behind_hold_the_next_pass() -> None:
    uows = MarksWaitUntilTold()
    await add(uows, *(message(f"k{n}", 1) for n in range(4)))
    sender = FakeSender()
    r = relay(sender, uows, batch_size=1)
    for _ in range(3):
        await r.publish_pending(mark_in_background=True)
    fourth = asyncio.create_task(r.publish_pending(mark_in_background=True))
    await asyncio.sleep(0.05)
    assert (fourth.done(), len(sender.sent)) == (False, 3)
    uows.go.set()
    assert await asyncio.wait_for(fourth, 1) == (1, 0)
    await eventually(lambda: not unpublished(uows))
    assert r.published == 4


async def test_leaving_marks_what_a_failed_mark_left_once() -> None:
    uows = MarksFail(failures=1)
    never = asyncio.Event()

    async def wait_for_work(seconds: float) -> None:
        await never.wait()

    sender = FakeSender()
    r = KafkaOutboxRelay(sender, uows, Topics(), FixedClock(), wait_for_work=wait_for_work)
    await add(uows, message("a", 1), message("b", 1))
    task = asyncio.create_task(r.run())
    await eventually(lambda: len(sender.sent) == 2 and uows.failures == 0)
    assert unpublished(uows) == [1, 2]  # the mark failed; nothing tries again until...
    r.stop()  # ...leaving settles it
    await asyncio.wait_for(task, 1)
    assert (unpublished(uows), r.published, len(sender.sent)) == ([], 2, 2)


async def test_run_ends_only_once_its_marks_are_committed() -> None:
    # Another leader would publish the rows again: `run` settles its marks before leaving.
    uows = MarksWaitUntilTold()
    never = asyncio.Event()

    async def wait_for_work(seconds: float) -> None:
        await never.wait()  # only `stop` ends this wait

    sender = FakeSender()
    r = KafkaOutboxRelay(sender, uows, Topics(), FixedClock(), wait_for_work=wait_for_work)
    await add(uows, message("a", 1))
    task = asyncio.create_task(r.run())
    await eventually(lambda: len(sender.sent) == 1)
    r.stop()
    await asyncio.sleep(0.05)
    assert (task.done(), unpublished(uows)) == (False, [1])  # the mark is under way
    uows.go.set()
    await asyncio.wait_for(task, 1)
    assert (unpublished(uows), r.published) == ([], 1)


async def test_leaving_waits_for_its_marks_a_bounded_time_then_leaves_them_to_the_next_leader(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A database that hangs must not hold a stop for ever: after `_SETTLE_WITHIN` the mark
    # is given up (cancelled, nothing of it commits later) and the row stays pending, to
    # be published again, with the same ce_id, by whoever leads next.
    monkeypatch.setattr(relay_module, "_SETTLE_WITHIN", 0.05)
    uows = MarksWaitUntilTold()
    never = asyncio.Event()

    async def wait_for_work(seconds: float) -> None:
        await never.wait()

    sender = FakeSender()
    r = KafkaOutboxRelay(sender, uows, Topics(), FixedClock(), wait_for_work=wait_for_work)
    await add(uows, message("a", 1))
    task = asyncio.create_task(r.run())
    await eventually(lambda: len(sender.sent) == 1)
    before = asyncio.all_tasks()
    r.stop()
    await asyncio.wait_for(task, 1)
    assert (unpublished(uows), r.published) == ([1], 0)
    assert "1 published rows left unmarked" in caplog.text
    marks = [t for t in before if t.get_name() == "outbox-relay-marks"]
    assert len(marks) == 1 and marks[0].cancelled()
    uows.go.set()  # the database answers again: the given-up mark stays given up
    await asyncio.sleep(0.01)
    assert unpublished(uows) == [1]

    again = FakeSender()
    assert await relay(again, uows).publish_pending() == (1, 0)
    assert unpublished(uows) == []
    assert [s.ce_id for s in again.sent] == [s.ce_id for s in sender.sent]


async def test_only_the_leader_publishes_and_a_standby_takes_over() -> None:
    uows = MemoryUnitOfWorkFactory()
    leadership = LockLeadership()
    first, second = FakeSender(), FakeSender()
    r1 = relay(first, uows, leadership=leadership)
    r2 = relay(second, uows, leadership=leadership)
    t1 = asyncio.create_task(r1.run())
    await eventually(lambda: r1.leading)
    t2 = asyncio.create_task(r2.run())
    await add(uows, message("a", 1), message("b", 1))
    await eventually(lambda: not unpublished(uows))
    assert (len(first.sent), len(second.sent), r2.leading) == (2, 0, False)

    r1.stop()
    await asyncio.wait_for(t1, 1)
    await eventually(lambda: r2.leading)
    await add(uows, message("a", 2))
    await eventually(lambda: not unpublished(uows))
    assert (len(first.sent), len(second.sent)) == (2, 1)

    r2.stop()  # returns promptly though it waits for work
    await asyncio.wait_for(t2, 1)


async def test_stop_interrupts_waiting_for_leadership() -> None:
    leadership = LockLeadership()
    r = relay(FakeSender(), MemoryUnitOfWorkFactory(), leadership=leadership)
    async with leadership.lock:  # another instance leads
        task = asyncio.create_task(r.run())
        await asyncio.sleep(0.05)
        assert not r.leading
        r.stop()
        await asyncio.wait_for(task, 1)


async def test_leadership_is_renewed_each_term() -> None:
    leadership = LockLeadership()
    r = relay(FakeSender(), MemoryUnitOfWorkFactory(), leadership=leadership, leadership_term=0)
    task = asyncio.create_task(r.run())
    await eventually(lambda: leadership.terms >= 3)
    r.stop()
    await asyncio.wait_for(task, 1)


async def test_cancelling_run_cancels_it() -> None:
    r = relay(FakeSender(), MemoryUnitOfWorkFactory())
    task = asyncio.create_task(r.run())
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_flush_publishes_everything_pending() -> None:
    uows = MemoryUnitOfWorkFactory()
    await add(uows, *(message(f"k{i % 7}", i) for i in range(30)))
    sender = FakeSender()
    r = relay(sender, uows, batch_size=4)
    assert await r.flush() == 30
    assert unpublished(uows) == []


async def test_flush_gives_up_after_its_grace_period() -> None:
    uows = MemoryUnitOfWorkFactory()
    await add(uows, message("a", 1))
    r = relay(FakeSender(lambda key, seq: True), uows)
    async with asyncio.timeout(2):
        assert await r.flush(grace_period=0.1) == 0
    assert unpublished(uows) == [1]


async def test_flush_does_not_publish_while_another_instance_leads() -> None:
    uows = MemoryUnitOfWorkFactory()
    await add(uows, message("a", 1))
    leadership = LockLeadership()
    sender = FakeSender()
    async with leadership.lock:
        assert await relay(sender, uows, leadership=leadership).flush(grace_period=0.1) == 0
    assert sender.sent == []


async def test_flush_returns_at_once_while_running_as_a_standby() -> None:
    uows = MemoryUnitOfWorkFactory()
    await add(uows, message("a", 1))
    leadership = LockLeadership()
    sender = FakeSender()
    r = relay(sender, uows, leadership=leadership)
    async with leadership.lock:  # another instance leads
        task = asyncio.create_task(r.run())
        await asyncio.sleep(0.02)
        async with asyncio.timeout(0.5):
            assert await r.flush(grace_period=5) == 0
        r.stop()
        await asyncio.wait_for(task, 1)
    assert sender.sent == []


async def test_flush_while_leading_publishes_alongside_run() -> None:
    uows = MemoryUnitOfWorkFactory()
    wake = asyncio.Event()

    async def never_wakes(seconds: float) -> None:
        await wake.wait()

    leadership = LockLeadership()
    sender = FakeSender()
    r = relay(sender, uows, leadership=leadership, wait_for_work=never_wakes)
    task = asyncio.create_task(r.run())
    await eventually(lambda: r.leading)
    await add(uows, message("a", 1), message("a", 2))
    assert await r.flush() == 2
    r.stop()
    await asyncio.wait_for(task, 1)
    assert [s.sequence for s in sender.sent] == [1, 2]


async def test_a_row_that_keeps_failing_slows_only_its_own_key() -> None:
    # The bad key has failed long enough for a relay-wide back-off to reach seconds; rows
    # of other keys committed since must still go out as soon as they are announced.
    uows = MemoryUnitOfWorkFactory()
    await add(uows, message("bad", 1), message("bad", 2))
    sender = FakeSender(fails=lambda key, seq: key == "bad")
    work = asyncio.Event()

    async def wait_for_work(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await work.wait()
        work.clear()

    r = KafkaOutboxRelay(
        sender, uows, Topics(), FixedClock(), wait_for_work=wait_for_work, poll_interval=5.0
    )
    task = asyncio.create_task(r.run())
    try:
        await eventually(lambda: r.send_failures >= 6, 30, what="the bad key failing")
        for sequence in (1, 2, 3):
            await add(uows, message(f"good-{sequence}", 1), message("good", sequence))
            work.set()
            expected = list(range(1, sequence + 1))
            await eventually(
                lambda expected=expected: (
                    [s.sequence for s in sender.sent if s.key == "good"] == expected
                ),
                1.0,
                what=f"good {sequence} published while bad backs off",
            )
        # The bad key is held back, never dropped, and its rows never overtake each other.
        # (What went out is marked by a task of its own, beside the relay's next pass.)
        await eventually(lambda: unpublished(uows) == [1, 2], 1.0, what="the good rows marked")
        assert {s.key for s in sender.sent} == {"good", "good-1", "good-2", "good-3"}
    finally:
        r.stop()
        await asyncio.wait_for(task, 5)


async def test_a_failing_key_whose_rows_are_gone_is_forgotten() -> None:
    # Another instance published the rows meanwhile: nothing of the key is left to wait for.
    uows = MemoryUnitOfWorkFactory()
    await add(uows, message("a", 1), message("b", 1))
    r = relay(FakeSender(fails=lambda key, seq: key == "a"), uows)
    assert await r.publish_pending() == (2, 1)
    async with uows() as uow:
        await uow.outbox.mark_published([1], NOW)
        await uow.commit()
    await asyncio.sleep(0.02)
    assert await r.publish_pending() == (0, 0)
    assert len(r._keys) == 0
    await r.flush(grace_period=1.0)  # returns at once: nothing pending, nothing failing


# -- spans when nothing records them ---------------------------------------------------

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class CountingTracer(PropagatingTracer):
    """The tracer of a service without an exporter, counting the spans it makes."""

    def __init__(self) -> None:
        super().__init__()
        self.started = 0

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        self.started += 1
        return super().start_span(*args, **kwargs)


class PublishedLines(logging.Handler):
    """The relay's "published" lines, with the trace id in force when each was written."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("published"):
            trace_id = trace.get_current_span().get_span_context().trace_id
            self.lines.append((record.getMessage(), f"{trace_id:032x}"))


async def test_when_nothing_records_spans_a_row_gets_one_only_for_its_published_line() -> None:
    uows = MemoryUnitOfWorkFactory()
    traced = msgspec.structs.replace(
        message("a", 1), trace=TraceHeaders(traceparent=f"00-{TRACE_ID}-00f067aa0ba902b7-01")
    )
    await add(uows, traced, message("b", 1), message("c", 1))
    tracer = CountingTracer()
    one_line = LogBudget(per_second=1, clock=lambda: 0.0)  # the first line, then none
    lines = PublishedLines()
    relay_log = logging.getLogger("payment.adapters.kafka.relay")
    level = relay_log.level
    relay_log.addHandler(lines)
    relay_log.setLevel(logging.INFO)
    try:
        r = relay(FakeSender(), uows, tracer=tracer, log_budget=one_line)
        assert await r.publish_pending() == (3, 0)
    finally:
        relay_log.removeHandler(lines)
        relay_log.setLevel(level)

    assert unpublished(uows) == []
    # The one line written is in the trace stored with its row; the rows without a line
    # made no span at all (with a span per row this would be 3).
    assert lines.lines == [("published payment.initiated", TRACE_ID)]
    assert tracer.started == 1


async def test_a_tracer_that_records_gets_a_span_per_row_whether_or_not_it_is_logged() -> None:
    tracer, exporter = recording_tracer()
    uows = MemoryUnitOfWorkFactory()
    await add(uows, message("a", 1), message("b", 1), message("c", 1))
    no_lines = LogBudget(per_second=1, clock=lambda: 0.0)
    no_lines.allow("used up")
    r = relay(FakeSender(), uows, tracer=tracer, log_budget=no_lines)

    assert await r.publish_pending() == (3, 0)
    assert len(exporter.get_finished_spans()) == 3


async def test_when_nothing_records_spans_a_failed_send_still_holds_back_only_its_key() -> None:
    uows = MemoryUnitOfWorkFactory()
    await add(uows, message("a", 1), message("b", 1), message("a", 2))
    tracer = CountingTracer()
    sender = FakeSender(fails=lambda key, seq: key == "a")
    r = relay(sender, uows, tracer=tracer)

    # Row a/1 fails without a span to mark; b/1 goes out, a/2 stays behind a/1.
    assert await r.publish_pending() == (3, 2)
    assert [(s.key, s.sequence) for s in sender.sent] == [("b", 1)]
    assert unpublished(uows) == [1, 3]
    assert r.send_failures == 1
    # The one line written ("published" for b/1, the default budget) is the only span.
    assert tracer.started == 1
