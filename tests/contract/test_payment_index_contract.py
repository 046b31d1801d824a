"""PaymentIndex contract: one payment per booking and the in-flight query, on every adapter."""

from __future__ import annotations

import uuid

import pytest
from contract_builders import race

from payment.application.errors import BookingAlreadyClaimed
from payment.application.ports import UnitOfWork, UnitOfWorkFactory
from payment.domain.payment import PaymentStatus
from support.events import at


async def _claim(uow_factory: UnitOfWorkFactory, booking_id: str, seconds: float = 0) -> uuid.UUID:
    payment_id = uuid.uuid4()
    async with uow_factory() as uow:
        await uow.payments.claim_booking(booking_id, payment_id, at(seconds))
        await uow.commit()
    return payment_id


async def test_a_claimed_booking_leads_to_its_payment(uow_factory: UnitOfWorkFactory) -> None:
    payment_id = await _claim(uow_factory, "booking-1")
    async with uow_factory() as uow:
        assert await uow.payments.payment_for_booking("booking-1") == payment_id
        assert await uow.payments.payment_for_booking("booking-2") is None


async def test_a_unit_of_work_reads_its_own_claim(uow_factory: UnitOfWorkFactory) -> None:
    payment_id = uuid.uuid4()
    async with uow_factory() as uow:
        await uow.payments.claim_booking("booking-1", payment_id, at(0))
        assert await uow.payments.payment_for_booking("booking-1") == payment_id


async def test_a_claim_is_visible_to_others_only_after_commit(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as writer:
        await writer.payments.claim_booking("booking-1", uuid.uuid4(), at(0))
        async with uow_factory() as reader:
            assert await reader.payments.payment_for_booking("booking-1") is None
    # Rolled back: the booking is free again.
    async with uow_factory() as reader:
        assert await reader.payments.payment_for_booking("booking-1") is None
    await _claim(uow_factory, "booking-1")


async def test_a_booking_is_claimed_once(uow_factory: UnitOfWorkFactory) -> None:
    first = await _claim(uow_factory, "booking-1")
    with pytest.raises(BookingAlreadyClaimed) as raised:
        await _claim(uow_factory, "booking-1")
    assert raised.value.booking_id == "booking-1"
    async with uow_factory() as uow:
        assert await uow.payments.payment_for_booking("booking-1") == first


async def test_a_booking_is_claimed_once_in_one_unit_of_work(
    uow_factory: UnitOfWorkFactory,
) -> None:
    with pytest.raises(BookingAlreadyClaimed):
        async with uow_factory() as uow:
            await uow.payments.claim_booking("booking-1", uuid.uuid4(), at(0))
            await uow.payments.claim_booking("booking-1", uuid.uuid4(), at(0))
            await uow.commit()


async def test_a_booking_expected_free_is_claimed_or_its_unit_of_work_fails(
    uow_factory: UnitOfWorkFactory,
) -> None:
    payment_id = uuid.uuid4()
    async with uow_factory() as uow:
        await uow.payments.claim_free_bookings([("booking-1", payment_id)], at(0))
        await uow.commit()
    # Taken: the unit of work fails (here or at commit) and keeps nothing of itself.
    with pytest.raises(BookingAlreadyClaimed) as raised:
        async with uow_factory() as uow:
            await uow.payments.set_status(payment_id, PaymentStatus.COMPLETED, at(1))
            await uow.payments.claim_free_bookings([("booking-1", uuid.uuid4())], at(1))
            await uow.commit()
    assert raised.value.booking_id == "booking-1"
    async with uow_factory() as uow:
        assert await uow.payments.payment_for_booking("booking-1") == payment_id
        assert await uow.payments.in_flight_since(at(5), 10) == [payment_id]  # not COMPLETED


async def test_bookings_expected_free_are_claimed_together_or_not_at_all(
    uow_factory: UnitOfWorkFactory,
) -> None:
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with uow_factory() as uow:
        await uow.payments.claim_free_bookings([("booking-1", first), ("booking-2", second)], at(0))
        await uow.commit()
    async with uow_factory() as uow:
        assert await uow.payments.payment_for_booking("booking-1") == first
        assert await uow.payments.payment_for_booking("booking-2") == second
    # One of them taken: the unit of work fails and keeps none of its claims.
    with pytest.raises(BookingAlreadyClaimed):
        async with uow_factory() as uow:
            await uow.payments.claim_free_bookings(
                [("booking-3", third), ("booking-2", uuid.uuid4())], at(1)
            )
            await uow.commit()
    async with uow_factory() as uow:
        assert await uow.payments.payment_for_booking("booking-3") is None
        assert await uow.payments.payment_for_booking("booking-2") == second
    await _claim(uow_factory, "booking-3")


async def test_of_two_concurrent_claims_exactly_one_wins(uow_factory: UnitOfWorkFactory) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()

    async def claim_first(uow: UnitOfWork) -> None:
        await uow.payments.claim_booking("booking-1", first, at(0))

    async def claim_second(uow: UnitOfWork) -> None:
        await uow.payments.claim_booking("booking-1", second, at(0))

    outcome = await race(uow_factory, claim_first, claim_second)
    assert sorted(outcome) == [False, True]
    async with uow_factory() as uow:
        winner = await uow.payments.payment_for_booking("booking-1")
    assert winner == (first if outcome[0] else second)


async def test_in_flight_lists_initiated_payments_older_than_the_cutoff_oldest_first(
    uow_factory: UnitOfWorkFactory,
) -> None:
    late = await _claim(uow_factory, "booking-late", seconds=30)
    early = await _claim(uow_factory, "booking-early", seconds=10)
    middle = await _claim(uow_factory, "booking-middle", seconds=20)
    await _claim(uow_factory, "booking-new", seconds=40)
    async with uow_factory() as uow:
        assert await uow.payments.in_flight_since(at(40), 10) == [early, middle, late]
        assert await uow.payments.in_flight_since(at(40), 2) == [early, middle]
        # Strictly older than the cutoff.
        assert await uow.payments.in_flight_since(at(10), 10) == []


async def test_a_terminal_payment_is_no_longer_in_flight(uow_factory: UnitOfWorkFactory) -> None:
    done = await _claim(uow_factory, "booking-done", seconds=1)
    failed = await _claim(uow_factory, "booking-failed", seconds=2)
    running = await _claim(uow_factory, "booking-running", seconds=3)
    async with uow_factory() as uow:
        await uow.payments.set_status(done, PaymentStatus.COMPLETED, at(4))
        await uow.payments.set_status(failed, PaymentStatus.FAILED, at(5))
        await uow.commit()
    async with uow_factory() as uow:
        assert await uow.payments.in_flight_since(at(100), 10) == [running]


async def test_a_status_change_takes_effect_only_on_commit(
    uow_factory: UnitOfWorkFactory,
) -> None:
    payment_id = await _claim(uow_factory, "booking-1", seconds=1)
    async with uow_factory() as uow:
        await uow.payments.set_status(payment_id, PaymentStatus.COMPLETED, at(2))
    async with uow_factory() as uow:
        assert await uow.payments.in_flight_since(at(100), 10) == [payment_id]


async def test_requeue_sends_an_in_flight_payment_to_the_back_and_leaves_a_finished_one(
    uow_factory: UnitOfWorkFactory,
) -> None:
    first = await _claim(uow_factory, "booking-first", seconds=1)
    second = await _claim(uow_factory, "booking-second", seconds=2)
    done = await _claim(uow_factory, "booking-done", seconds=3)
    async with uow_factory() as uow:
        await uow.payments.set_status(done, PaymentStatus.COMPLETED, at(4))
        await uow.commit()
    async with uow_factory() as uow:
        await uow.payments.requeue(first, at(10))
    async with uow_factory() as uow:  # not committed: nothing moved
        assert await uow.payments.in_flight_since(at(100), 10) == [first, second]
    async with uow_factory() as uow:
        await uow.payments.requeue(first, at(10))
        await uow.payments.requeue(done, at(10))
        await uow.commit()
    async with uow_factory() as uow:
        assert await uow.payments.in_flight_since(at(100), 10) == [second, first]
        assert await uow.payments.in_flight_since(at(5), 10) == [second]


async def test_claims_take_the_oldest_stale_payments_and_lease_them(
    uow_factory: UnitOfWorkFactory,
) -> None:
    late = await _claim(uow_factory, "booking-late", seconds=3)
    early = await _claim(uow_factory, "booking-early", seconds=1)
    middle = await _claim(uow_factory, "booking-middle", seconds=2)
    async with uow_factory() as uow:
        assert await uow.payments.claim_stale(at(10), 2, at(50)) == [early, middle]
        await uow.commit()
    async with uow_factory() as uow:
        # Leased until the cutoff passes the claim's time again.
        assert await uow.payments.claim_stale(at(10), 10, at(50)) == [late]
        await uow.commit()
    async with uow_factory() as uow:
        assert await uow.payments.claim_stale(at(10), 10, at(60)) == []
        assert set(await uow.payments.claim_stale(at(51), 10, at(60))) == {early, middle, late}


async def test_concurrent_claimers_get_disjoint_payments_and_a_rollback_frees_its_own(
    uow_factory: UnitOfWorkFactory,
) -> None:
    ids = [await _claim(uow_factory, f"booking-{i}", seconds=i) for i in range(5)]
    async with uow_factory() as first, uow_factory() as second:
        mine = await first.payments.claim_stale(at(10), 3, at(50))
        theirs = await second.payments.claim_stale(at(10), 3, at(50))
        assert mine == ids[:3]
        assert theirs == ids[3:]
        await second.commit()
        # `first` ends without committing: its claims were never made.
    async with uow_factory() as uow:
        assert await uow.payments.claim_stale(at(10), 10, at(50)) == ids[:3]


# -- refunds: closed bookings and the refunds-pending mark ------------------------------


async def test_closing_a_booking_without_a_payment_keeps_payments_out(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as uow:
        assert await uow.payments.close_booking("booking-1", at(0)) is None
        await uow.commit()
    async with uow_factory() as uow:
        assert await uow.payments.booking_closed("booking-1")
        assert await uow.payments.payment_for_booking("booking-1") is None
        assert not await uow.payments.booking_closed("booking-2")
    with pytest.raises(BookingAlreadyClaimed):
        await _claim(uow_factory, "booking-1")
    async with uow_factory() as uow:  # closing again is no change
        assert await uow.payments.close_booking("booking-1", at(1)) is None
        await uow.commit()


async def test_closing_a_booking_that_has_a_payment_names_it_and_changes_nothing(
    uow_factory: UnitOfWorkFactory,
) -> None:
    payment_id = await _claim(uow_factory, "booking-1")
    async with uow_factory() as uow:
        assert await uow.payments.close_booking("booking-1", at(1)) == payment_id
        await uow.commit()
    async with uow_factory() as uow:
        assert not await uow.payments.booking_closed("booking-1")
        assert await uow.payments.payment_for_booking("booking-1") == payment_id


@pytest.mark.parametrize("close_first", [True, False])
async def test_a_close_racing_a_claim_one_takes_effect(
    uow_factory: UnitOfWorkFactory, close_first: bool
) -> None:
    async def close(uow: UnitOfWork) -> None:
        await uow.payments.close_booking("booking-1", at(0))

    async def claim(uow: UnitOfWork) -> None:
        await uow.payments.claim_booking("booking-1", uuid.uuid4(), at(0))

    await race(uow_factory, *((close, claim) if close_first else (claim, close)))
    async with uow_factory() as uow:
        closed = await uow.payments.booking_closed("booking-1")
        paid = await uow.payments.payment_for_booking("booking-1") is not None
    assert closed != paid


async def _mark(uow_factory: UnitOfWorkFactory, payment_id: uuid.UUID, since: float | None) -> None:
    async with uow_factory() as uow:
        await uow.payments.set_refunds_pending(payment_id, None if since is None else at(since))
        await uow.commit()


async def _settle(uow_factory: UnitOfWorkFactory, payment_id: uuid.UUID, seconds: float) -> None:
    async with uow_factory() as uow:
        await uow.payments.set_status(payment_id, PaymentStatus.COMPLETED, at(seconds))
        await uow.commit()


async def test_refunds_are_due_once_their_charge_settled_after_them_or_past_the_cutoff(
    uow_factory: UnitOfWorkFactory,
) -> None:
    waiting = await _claim(uow_factory, "booking-waiting", seconds=0)
    stale = await _claim(uow_factory, "booking-stale", seconds=0)
    fresh = await _claim(uow_factory, "booking-fresh", seconds=0)
    in_flight = await _claim(uow_factory, "booking-in-flight", seconds=0)
    for payment_id in (stale, fresh):
        await _settle(uow_factory, payment_id, 1)
    await _mark(uow_factory, waiting, 2)
    await _mark(uow_factory, stale, 3)
    await _mark(uow_factory, fresh, 50)
    await _mark(uow_factory, in_flight, 4)
    async with uow_factory() as uow:  # the charge in flight: nobody's refunds are due
        assert await uow.payments.refunds_due(at(40), 10) == [stale]
    await _settle(uow_factory, waiting, 5)
    async with uow_factory() as uow:
        assert await uow.payments.refunds_due(at(40), 10) == [waiting, stale]
        assert await uow.payments.refunds_due(at(40), 1) == [waiting]
    await _mark(uow_factory, waiting, None)
    async with uow_factory() as uow:
        assert await uow.payments.refunds_due(at(40), 10) == [stale]


async def test_requeued_refunds_go_to_the_back_and_an_unmarked_payment_stays_unmarked(
    uow_factory: UnitOfWorkFactory,
) -> None:
    marked = await _claim(uow_factory, "booking-marked")
    unmarked = await _claim(uow_factory, "booking-unmarked")
    for payment_id in (marked, unmarked):
        await _settle(uow_factory, payment_id, 1)
    await _mark(uow_factory, marked, 2)
    async with uow_factory() as uow:
        await uow.payments.requeue_refunds(marked, at(30))
        await uow.payments.requeue_refunds(unmarked, at(30))
        await uow.commit()
    async with uow_factory() as uow:
        assert await uow.payments.refunds_due(at(20), 10) == []
        assert await uow.payments.refunds_due(at(31), 10) == [marked]
