"""The ids the service makes: UUID version 7, ordered by the millisecond they were made in."""

from __future__ import annotations

import time
import uuid

from payment.adapters.memory import MemoryUnitOfWorkFactory
from payment.application.handlers import request_payment
from payment.domain.ids import new_id
from support.clock import FakeClock
from support.commands import request_cmd
from support.payments import initiate_payment


def _millis(value: uuid.UUID) -> int:
    return value.int >> 80


def test_a_new_id_is_an_rfc_9562_version_7_uuid_of_the_current_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    made = new_id()
    after = time.time_ns() // 1_000_000

    assert made.version == 7
    assert made.variant == uuid.RFC_4122
    assert before <= _millis(made) <= after
    assert uuid.UUID(str(made)) == made


def test_ids_made_in_a_later_millisecond_sort_after_earlier_ones_as_uuids_and_as_text() -> None:
    first = new_id()
    while _millis(second := new_id()) == _millis(first):
        pass

    assert first < second
    assert str(first) < str(second)


def test_ids_made_in_the_same_millisecond_differ_in_their_random_bits() -> None:
    made = [new_id() for _ in range(20_000)]
    by_millisecond: dict[int, list[uuid.UUID]] = {}
    for value in made:
        by_millisecond.setdefault(_millis(value), []).append(value)

    assert max(len(ids) for ids in by_millisecond.values()) > 1
    assert len(set(made)) == len(made)


def test_a_payment_and_its_events_get_version_7_ids() -> None:
    payment, [initiated] = initiate_payment()
    [completed] = payment.complete(
        processor="fake", provider_reference="ch_1", at=initiated.occurred_at
    )

    assert initiated.event_id.version == 7
    assert completed.event_id.version == 7
    assert initiated.idempotency_key.version == 4  # travels to the gateway, indexes nothing


async def test_a_requested_payment_and_its_outbox_row_get_version_7_ids() -> None:
    uows = MemoryUnitOfWorkFactory()

    await request_payment(request_cmd("BK-7"), uows, FakeClock())

    payment_id = uows.db.bookings["BK-7"]
    [row] = uows.db.outbox
    assert payment_id.version == 7
    assert row.message.event_id.version == 7
