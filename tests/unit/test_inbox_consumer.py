"""KafkaInboxConsumer without a broker: its batch fallback and its shutdown.

A batch whose handler raises (an outage, a bug) is handled again one message at a time.
Records whose envelope decodes but whose body does not are taken out of the batch before
the handler runs; they must be among those handled again, and so be dead-lettered,
rather than have their offsets move with nothing done.

A stop during an outage, with every slot held by handlers waiting for it to end, must
still reach the drain, whose timeout bounds the shutdown.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from payment.adapters.kafka.consumer import KafkaInboxConsumer
from payment.adapters.kafka.consumer.intake_gate import ALWAYS_OPEN, IntakeGate
from payment.adapters.memory import MemoryUnitOfWork, MemoryUnitOfWorkFactory, SystemClock
from payment.adapters.observability.metrics import Metrics
from payment.adapters.processors.fake import FakeProcessor
from payment.application.handlers import ExecutionPolicy, RequestPolicy
from payment.runtime.transient import is_transient
from support.waiting import eventually

REQUESTS = "saga.request_payment"
INITIATED = "payment.initiated"
TP = TopicPartition(REQUESTS, 0)


def request_record(offset: int, value: bytes) -> ConsumerRecord[bytes, bytes]:
    return cloudevent_record(TP, f"req-{offset}", "saga-orchestrator", offset, value)


def cloudevent_record(
    tp: TopicPartition, ce_id: str, source: str, offset: int, value: bytes
) -> ConsumerRecord[bytes, bytes]:
    """A binary-mode CloudEvent on `tp`'s topic, its `ce_type` the topic's name."""
    headers: Sequence[tuple[str, bytes]] = [
        ("ce_specversion", b"1.0"),
        ("ce_id", ce_id.encode()),
        ("ce_source", source.encode()),
        ("ce_type", tp.topic.encode()),
        ("ce_time", b"2026-01-02T03:04:05Z"),
        ("content-type", b"application/json"),
    ]
    return ConsumerRecord(
        topic=tp.topic,
        partition=tp.partition,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=b"k",
        value=value,
        checksum=None,
        serialized_key_size=1,
        serialized_value_size=len(value),
        headers=list(headers),
    )


def valid(booking: str) -> bytes:
    return json.dumps(
        {"booking_id": booking, "amount": 1000, "currency": "EUR", "payment_method": "tok_visa"}
    ).encode()


class ParkedRecords:
    def __init__(self) -> None:
        self.parked: list[tuple[int, str]] = []

    async def publish(self, record: ConsumerRecord[bytes, bytes], reason: str) -> None:
        self.parked.append((record.offset, reason))


class CommitsFail(MemoryUnitOfWorkFactory):
    """The database refuses the first `times` commits with `error()` (by default it drops
    the connection), then recovers."""

    def __init__(
        self,
        times: float = math.inf,
        error: Callable[[], Exception] = lambda: psycopg.OperationalError(
            "server closed the connection unexpectedly"
        ),
    ) -> None:
        super().__init__()
        self.left = times
        self.error = error
        self.failed = 0

    def __call__(self) -> MemoryUnitOfWork:
        uow = super().__call__()
        if self.left > 0:
            self.left -= 1

            async def refused() -> None:
                self.failed += 1
                raise self.error()

            uow.commit = refused  # type: ignore[method-assign]
        return uow


class Broker:
    """Stands in for AIOKafkaConsumer: one fetch of `records`, then nothing."""

    def __init__(self, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        self.records = records
        self.committed: list[dict[TopicPartition, int]] = []
        self.stopped = False
        self.paused_now: set[TopicPartition] = set()

    async def getmany(
        self, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        if self.records:
            fetched, self.records = self.records, []
            return {TP: fetched}
        await asyncio.sleep(timeout_ms / 1000)
        return {}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.committed.append(dict(offsets))

    async def stop(self) -> None:
        self.stopped = True

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused_now |= set(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused_now -= set(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_now)


def consumer(
    uows: MemoryUnitOfWorkFactory,
    parked: ParkedRecords,
    broker: Broker | None = None,
    assigned: frozenset[TopicPartition] = frozenset({TP}),
    intake: IntakeGate = ALWAYS_OPEN,
    **options: float,
) -> KafkaInboxConsumer:
    async def connect(listener: Any) -> Broker:
        if broker is None:
            raise AssertionError("the batch path needs no broker")
        await listener.on_partitions_assigned(set(assigned))
        return broker

    return KafkaInboxConsumer(
        consumer_factory=connect,  # type: ignore[arg-type]
        request_topic=REQUESTS,
        initiated_topic=INITIATED,
        uow_factory=uows,
        processor=FakeProcessor(),
        clock=SystemClock(),
        dead_letters=parked,
        metrics=Metrics(),
        request_policy=RequestPolicy(),
        policy=ExecutionPolicy(),
        is_transient=is_transient,
        intake=intake,
        **options,  # type: ignore[arg-type]
    )


async def test_a_failed_batch_still_parks_its_records_with_an_undecodable_body() -> None:
    uows = CommitsFail(times=1)  # the batch's commit
    parked = ParkedRecords()
    wrong_type = json.dumps(
        {"booking_id": "BK-2", "amount": "1000", "currency": "EUR", "payment_method": "tok_visa"}
    ).encode()
    chunk = [
        (TP, request_record(10, valid("BK-1"))),
        (TP, request_record(11, wrong_type)),  # contract 4.5: a wrong type is undecodable
        (TP, request_record(12, valid("BK-3"))),
    ]

    await consumer(uows, parked)._handle_batch(chunk)

    assert uows.failed == 1  # the batch's transaction did fail
    assert [offset for offset, _ in parked.parked] == [11]
    assert sorted(uows.db.bookings) == ["BK-1", "BK-3"]


async def test_a_batch_that_succeeds_parks_the_same_record_once() -> None:
    uows = MemoryUnitOfWorkFactory()
    parked = ParkedRecords()
    chunk = [
        (TP, request_record(20, valid("BK-7"))),
        (TP, request_record(21, b"{not json")),
        (TP, request_record(22, valid("BK-8"))),
    ]

    await consumer(uows, parked)._handle_batch(chunk)

    assert [offset for offset, _ in parked.parked] == [21]
    assert sorted(uows.db.bookings) == ["BK-7", "BK-8"]


async def test_a_stop_during_an_outage_drains_within_its_timeout() -> None:
    # Two slots, four requests: two handlers retry against a database that is down, and
    # the loop waits for a slot for the third.
    broker = Broker([request_record(n, valid(f"BK-{n}")) for n in range(30, 34)])
    inbox = consumer(CommitsFail(), ParkedRecords(), broker, max_in_flight=2, drain_timeout_s=0.2)
    running = asyncio.create_task(inbox.run())
    await eventually(inbox._slots.locked, 5, what="every slot taken")

    inbox.stop()
    async with asyncio.timeout(5):  # the drain's 0.2 s, not the outage's end
        await running

    assert broker.stopped
    # Nothing was handled, so nothing was committed: all four are read again.
    assert all(o[TP] <= 30 for o in broker.committed)


def read_only_commits(times: int) -> CommitsFail:
    """The database is read-only (a failover, a maintenance switch) for `times` commits."""
    return CommitsFail(
        times,
        lambda: psycopg.errors.ReadOnlySqlTransaction(
            "cannot execute INSERT in a read-only transaction"
        ),
    )


async def test_a_read_only_database_is_waited_out_and_never_dead_letters() -> None:
    # 25006 is an InternalError to psycopg, but an outage by its SQLSTATE: more refusals
    # than a handler error is allowed must still end in the payment, not a dead letter.
    uows = read_only_commits(times=12)
    parked = ParkedRecords()
    inbox = consumer(uows, parked, retry_initial_s=0.001, retry_max_s=0.005)

    await inbox._handle(request_record(40, valid("BK-40")))

    assert uows.failed == 12
    assert parked.parked == []
    assert list(uows.db.bookings) == ["BK-40"]


INITIATED_TP = TopicPartition(INITIATED, 0)


def initiated_record(offset: int) -> ConsumerRecord[bytes, bytes]:
    value = json.dumps(
        {
            "payment_id": str(uuid.uuid4()),
            "booking_id": f"BK-x{offset}",
            "saga_id": None,
            "amount": 1000,
            "currency": "EUR",
            "customer_id": None,
            "initiated_at": "2026-01-02T03:04:05Z",
            "version": 1,
        }
    ).encode()
    return cloudevent_record(INITIATED_TP, f"init-{offset}", "payment-service", offset, value)


class Fetches(Broker):
    """Hands out one fetch after another (then nothing), each a partition's records;
    a paused partition's fetch waits until it is resumed, as the broker keeps them."""

    def __init__(self, fetches: list[tuple[TopicPartition, list[ConsumerRecord[bytes, bytes]]]]):
        super().__init__([])
        self.fetches = fetches

    async def getmany(
        self, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        for i, (tp, records) in enumerate(self.fetches):
            if tp not in self.paused_now:
                del self.fetches[i]
                return {tp: records}
        await asyncio.sleep(timeout_ms / 1000)
        return {}


class SlowRequests(MemoryUnitOfWorkFactory):
    """Requests (from the orchestrator) wait at the inbox until `gate` opens."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.waiting = 0

    def __call__(self) -> MemoryUnitOfWork:
        uow = super().__call__()
        mark_new = uow.inbox.mark_new

        async def gated(keys: Any, at: Any) -> None:
            if any(source == "saga-orchestrator" for source, _ in keys):
                self.waiting += 1
                await self.gate.wait()
            await mark_new(keys, at)

        uow.inbox.mark_new = gated  # type: ignore[method-assign]
        return uow


async def test_a_burst_of_requests_leaves_room_for_the_executor_and_waits_at_the_broker() -> None:
    # Eight slots; a burst of requests (three fetches of 12) whose handling is stuck, then
    # payment.initiated: the requests hold at most their share (6), the rest stays for
    # the executor, and the requests not admitted wait on the broker (paused partition),
    # not in memory.
    uows = SlowRequests()
    burst = [
        (TP, [request_record(n, valid(f"BK-{n}")) for n in range(start, start + 12)])
        for start in (0, 12, 24)
    ]
    broker = Fetches([*burst, (INITIATED_TP, [initiated_record(n) for n in range(4)])])

    inbox = consumer(
        uows,
        ParkedRecords(),
        broker,
        frozenset({TP, INITIATED_TP}),
        max_in_flight=8,
        max_batch=1,
    )
    running = asyncio.create_task(inbox.run())
    try:
        # The executor's four messages are handled while every request is stuck.
        await eventually(
            lambda: sum(1 for key in uows.db.inbox if key[0] == "payment-service") == 4,
            5,
            what="payment.initiated handled during the request burst",
        )
        assert uows.waiting == 6
        assert inbox.backlog <= 12  # one fetch held at most, the rest left on the broker
        assert TP in broker.paused_now
        assert len(broker.fetches) >= 1  # a request fetch never taken while paused

        uows.gate.set()
        await eventually(lambda: len(uows.db.bookings) == 36, 5, what="every request handled")
        assert inbox.backlog == 0
        assert TP not in broker.paused_now
    finally:
        uows.gate.set()
        inbox.stop()
        async with asyncio.timeout(5):
            await running


class Gate:
    """An intake gate opened and closed by the test (the outbox backlog's stand-in)."""

    def __init__(self, *, admits_requests: bool) -> None:
        self.admits_requests = admits_requests


async def test_a_closed_intake_gate_holds_requests_and_lets_payment_initiated_through() -> None:
    # The outbox backlog is high: requests fetched wait (their partition paused) with
    # every slot free, while the executor's payment.initiated is handled, since executing
    # drains the work. Once the gate opens, the held requests go.
    uows = MemoryUnitOfWorkFactory()
    gate = Gate(admits_requests=False)
    broker = Fetches(
        [
            (TP, [request_record(n, valid(f"BK-{n}")) for n in range(5)]),
            (INITIATED_TP, [initiated_record(n) for n in range(3)]),
            (TP, [request_record(n, valid(f"BK-{n}")) for n in range(5, 10)]),
        ]
    )
    inbox = consumer(uows, ParkedRecords(), broker, frozenset({TP, INITIATED_TP}), gate)
    running = asyncio.create_task(inbox.run())
    try:
        await eventually(
            lambda: sum(1 for key in uows.db.inbox if key[0] == "payment-service") == 3,
            5,
            what="payment.initiated handled while intake is closed",
        )
        assert uows.db.bookings == {}  # no request dispatched
        assert inbox.backlog == 5 and TP in broker.paused_now
        assert len(broker.fetches) == 1  # the next requests stay on the broker

        gate.admits_requests = True
        await eventually(lambda: len(uows.db.bookings) == 10, 5, what="every request handled")
        assert inbox.backlog == 0 and TP not in broker.paused_now
    finally:
        inbox.stop()
        async with asyncio.timeout(5):
            await running
