"""The outbox relay's failure paths: an acknowledgement that never comes, a row that cannot
be encoded or has no topic, and a database error while flushing at shutdown.

Each holds back its own row only: the other rows of the pass are published and marked,
the failing row stays pending for a later pass, and nothing raises out of a shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from payment.adapters.kafka.key_backoff import KeyBackoff
from payment.adapters.kafka.partitioner import key_partitioner
from payment.adapters.kafka.relay import KafkaOutboxRelay
from payment.adapters.kafka.topics import Topics
from payment.adapters.memory import MemoryUnitOfWork, MemoryUnitOfWorkFactory
from payment.application.messages import OutboundMessage
from payment.application.ports import OutboxRecord
from support.batching_producer import BatchingFake
from support.waiting import eventually

AT = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)
Ack = asyncio.Future[object]


class Clock:
    def now(self) -> datetime:
        return AT


class Producer:
    """Acknowledges each record at once, except keys in `silent`: their ack never comes."""

    def __init__(self, silent: Collection[str] = ()) -> None:
        self.silent = set(silent)
        self.acked: list[str] = []
        self.unanswered: list[Ack] = []

    async def send(self, topic: str, value: bytes | None = None, **record: Any) -> Ack:
        key = record["key"].decode()
        ack: Ack = asyncio.get_running_loop().create_future()
        if key in self.silent:
            self.unanswered.append(ack)
        else:
            self.acked.append(key)
            ack.set_result(None)
        return ack

    async def send_and_wait(self, topic: str, *args: Any, **kwargs: Any) -> object:
        return await (await self.send(topic, *args, **kwargs))


def row(key: str, kind: str = "payment.completed") -> OutboundMessage:
    return OutboundMessage(
        event_id=uuid.uuid4(),
        type=kind,  # type: ignore[arg-type]
        key=key,
        subject=key,
        sequence=2,
        time=AT,
        data=b"{}",
    )


async def outbox_of(*messages: OutboundMessage) -> MemoryUnitOfWorkFactory:
    uows = MemoryUnitOfWorkFactory()
    async with uows() as uow:
        await uow.outbox.add(messages)
        await uow.commit()
    return uows


def pending_keys(uows: MemoryUnitOfWorkFactory) -> list[str]:
    return [r.message.key for r in uows.db.outbox if r.published_at is None]


def relay_of(producer: Any, uows: Any, **options: Any) -> KafkaOutboxRelay:
    return KafkaOutboxRelay(producer, uows, Topics(), Clock(), max_backoff=0.01, **options)


async def test_an_acknowledgement_that_never_comes_times_out_and_holds_back_its_row() -> None:
    uows = await outbox_of(row("pay-silent"), row("pay-ok"))
    producer = Producer(silent={"pay-silent"})
    relay = relay_of(producer, uows, ack_timeout=0.05)

    assert await relay.publish_pending() == (2, 1)

    assert producer.acked == ["pay-ok"]
    assert pending_keys(uows) == ["pay-silent"]
    assert relay.send_failures == 1
    assert [ack.cancelled() for ack in producer.unanswered] == [True]  # not left dangling

    producer.silent.clear()  # the broker answers again: the row goes out once its key is due

    async def published() -> bool:
        await relay.publish_pending()
        return not pending_keys(uows)

    await eventually(published, what="the held-back row published")
    assert producer.acked == ["pay-ok", "pay-silent"]


async def test_a_row_that_cannot_be_encoded_holds_back_its_own_key_only() -> None:
    # A lone surrogate cannot be encoded to UTF-8 (a corrupt row, a bug upstream).
    uows = await outbox_of(row("pay-\ud800"), row("pay-ok"))
    producer = Producer()
    relay = relay_of(producer, uows)

    assert await relay.publish_pending() == (2, 1)

    assert producer.acked == ["pay-ok"]
    assert pending_keys(uows) == ["pay-\ud800"]


async def test_a_row_of_a_type_without_a_topic_holds_back_its_own_key_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    uows = await outbox_of(row("pay-odd", kind="payment.unheard_of"), row("pay-ok"))
    producer = Producer()
    relay = relay_of(producer, uows)

    with caplog.at_level(logging.ERROR, logger="payment"):
        assert await relay.publish_pending() == (2, 1)

    assert producer.acked == ["pay-ok"]
    assert pending_keys(uows) == ["pay-odd"]
    # Said as what it is (a type the service has no topic for), not as an encoding crash.
    (said,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert said.getMessage() == "outbox relay: no topic for type payment.unheard_of (row 1)"
    assert said.exc_info is None


class PendingReadFails(MemoryUnitOfWorkFactory):
    """The database is gone: reading the pending rows fails."""

    def __call__(self) -> MemoryUnitOfWork:
        uow = super().__call__()

        async def lost(limit: int, skip_keys: Collection[str] = ()) -> list[OutboxRecord]:
            raise psycopg.OperationalError("server closed the connection unexpectedly")

        uow.outbox.pending = lost  # type: ignore[method-assign]
        return uow


async def test_a_database_error_during_the_shutdown_flush_ends_the_flush_not_the_shutdown() -> None:
    uows = PendingReadFails()
    async with MemoryUnitOfWorkFactory(uows.db)() as uow:
        await uow.outbox.add([row("pay-left")])
        await uow.commit()
    producer = Producer()
    relay = relay_of(producer, uows)

    assert await relay.flush(grace_period=5) == 0  # returns, does not raise

    assert producer.acked == []
    assert pending_keys(uows) == ["pay-left"]  # left for the next leader


async def test_a_batch_held_past_the_ack_timeout_fails_its_rows_and_backs_off_their_keys() -> None:
    # With the broker away, aiokafka holds a partition's next batch until the one before
    # has gone: the rows of that partition fail at `ack_timeout`, the others go out.
    topic = Topics().outbound["payment.completed"]
    every = [0, 1, 2]
    keys = [f"pay-{n}" for n in range(12)]
    partition_of = {k: key_partitioner(k.encode(), every, every) for k in keys}
    stuck = partition_of["pay-0"]
    held = [k for k in keys if partition_of[k] == stuck]
    assert 0 < len(held) < len(keys)  # some rows held, some free
    uows = await outbox_of(*(row(k) for k in keys))
    producer = BatchingFake(partitions={topic: set(every)}, acks_at_once=True)
    producer.stuck = {stuck}
    now = [100.0]
    backoff = KeyBackoff(initial=1.0, maximum=1.0, clock=lambda: now[0], rng=lambda: 1.0)
    relay = relay_of(producer, uows, ack_timeout=0.05, key_backoff=backoff)

    assert await relay.publish_pending() == (len(keys), len(held))

    assert sorted(producer.keys()) == sorted(k.encode() for k in keys if k not in held)
    assert producer.one_by_one == []  # the batched path, not `send()`
    assert sorted(pending_keys(uows)) == sorted(held)
    assert relay.send_failures == len(held)
    # The held keys back off: the next pass leaves them out until they are due.
    assert await relay.publish_pending() == (0, 0)
    producer.stuck.clear()  # the broker is back
    now[0] += 1.0
    assert await relay.publish_pending() == (len(held), 0)
    assert pending_keys(uows) == []
    assert sorted(producer.keys()) == sorted(k.encode() for k in keys)
