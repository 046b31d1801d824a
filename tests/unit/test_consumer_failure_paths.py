"""The inbox consumer's own failure paths, driven through `run` with faults at its ports.

A handler that keeps failing is dead-lettered after five errors (`handler_error`); a
dead-letter publish that fails on the broker is retried by the parking itself; parking
that fails any other way sends the whole message round again. In each case the offset
moves only once the message is parked, and the message is parked exactly once.
"""

from __future__ import annotations

import logging

import pytest
from aiokafka.errors import KafkaConnectionError

from payment.adapters.memory import MemoryUnitOfWork, MemoryUnitOfWorkFactory
from support.inbox import QUICK, QueueBroker, ScriptedDeadLetters, booking, request, running_inbox
from support.waiting import eventually


class CommitsRaise(MemoryUnitOfWorkFactory):
    """A bug, not an outage: every commit raises the same programming error."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    def __call__(self) -> MemoryUnitOfWork:
        uow = super().__call__()

        async def bug() -> None:
            self.attempts += 1
            raise ZeroDivisionError("a bug in the handler")

        uow.commit = bug  # type: ignore[method-assign]
        return uow


async def test_a_handler_failing_five_times_is_dead_lettered_as_handler_error() -> None:
    broker = QueueBroker(request(40, booking("BK-40")))
    dead_letters = ScriptedDeadLetters()
    uows = CommitsRaise()

    async with running_inbox(broker, dead_letters, uows, **QUICK):
        await eventually(lambda: 41 in broker.commits, what="offset 40 committed")

    assert uows.attempts == 5  # tried five times, not once more
    assert dead_letters.parked == [(40, "handler error: ZeroDivisionError")]
    assert not uows.db.bookings  # nothing of the failed message was kept


async def test_a_dead_letter_the_broker_refuses_is_retried_by_the_parking_itself(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = QueueBroker(request(7, b"{not json"))
    dead_letters = ScriptedDeadLetters(
        KafkaConnectionError("broker away"), KafkaConnectionError("broker away")
    )

    with caplog.at_level(logging.WARNING, logger="payment"):
        async with running_inbox(broker, dead_letters, **QUICK):
            await eventually(lambda: 8 in broker.commits, what="offset 7 committed")

    assert dead_letters.attempts == 3
    assert [offset for offset, _ in dead_letters.parked] == [7]
    retries = [r for r in caplog.records if "dead-letter publish failed" in r.getMessage()]
    assert len(retries) == 2
    # The parking retried on its own: the whole message was not sent round again.
    assert not [r for r in caplog.records if "could not handle or park" in r.getMessage()]


async def test_parking_that_raises_sends_the_whole_message_round_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = QueueBroker(request(3, b"{not json"))
    # Not the broker's, not an outage: parking itself is broken this once.
    dead_letters = ScriptedDeadLetters(ValueError("cannot serialise the dead letter"))

    with caplog.at_level(logging.WARNING, logger="payment"):
        async with running_inbox(broker, dead_letters, **QUICK):
            await eventually(lambda: 4 in broker.commits, what="offset 3 committed")

    assert dead_letters.attempts == 2
    assert [offset for offset, _ in dead_letters.parked] == [3]
    assert [r for r in caplog.records if "could not handle or park" in r.getMessage()]
