"""FakeProcessor: success, fail and seeded random outcomes, idempotent per key, with latency."""

from __future__ import annotations

import json
import random
import time
import uuid
from pathlib import Path

import pytest

from payment.adapters.processors.fake import DECLINE_CODES, FakeProcessor
from payment.domain.money import Money
from payment.domain.processor import Approved, ChargeOutcome, ChargeRequest, Declined

KNOWN_DECLINE_CODES = {code for code, _ in DECLINE_CODES}


def charge_request(booking_id: str = "BK-1", key: uuid.UUID | None = None) -> ChargeRequest:
    return ChargeRequest(
        payment_id=uuid.uuid4(),
        booking_id=booking_id,
        money=Money.of(1_000, "EUR"),
        payment_method="pm_card_visa",
        idempotency_key=key or uuid.uuid4(),
    )


def kind(outcome: ChargeOutcome) -> str:
    """What the booking experiences: approved, or declined with a code (references vary)."""
    return "approved" if isinstance(outcome, Approved) else f"declined:{outcome.code}"


async def test_success_mode_approves_every_charge_with_a_reference() -> None:
    processor = FakeProcessor(mode="success")

    outcomes = [await processor.charge(charge_request(f"BK-{i}")) for i in range(50)]

    assert all(isinstance(o, Approved) and o.provider_reference for o in outcomes)
    references = {o.provider_reference for o in outcomes if isinstance(o, Approved)}
    assert len(references) == 50


async def test_fail_mode_declines_every_charge_with_a_known_decline_code() -> None:
    processor = FakeProcessor(mode="fail")

    outcomes = [await processor.charge(charge_request(f"BK-{i}")) for i in range(50)]

    assert all(isinstance(o, Declined) for o in outcomes)
    codes = {o.code for o in outcomes if isinstance(o, Declined)}
    assert codes <= KNOWN_DECLINE_CODES
    assert all(o.message for o in outcomes if isinstance(o, Declined))


async def test_a_success_rate_of_one_or_zero_makes_random_mode_certain() -> None:
    always = FakeProcessor(mode="random", success_rate=1.0, seed=3)
    never = FakeProcessor(mode="random", success_rate=0.0, seed=3)

    for i in range(200):
        assert isinstance(await always.charge(charge_request(f"BK-{i}")), Approved)
        assert isinstance(await never.charge(charge_request(f"BK-{i}")), Declined)


async def test_random_mode_with_a_seed_decides_per_booking_whatever_the_call_order() -> None:
    bookings = [f"BK-{i}" for i in range(300)]
    shuffled = bookings.copy()
    random.Random(99).shuffle(shuffled)
    first = FakeProcessor(mode="random", success_rate=0.5, seed=2026)
    second = FakeProcessor(mode="random", success_rate=0.5, seed=2026)

    # Different order and different idempotency keys: only seed and booking id may matter.
    in_order = {b: kind(await first.charge(charge_request(b))) for b in bookings}
    reordered = {b: kind(await second.charge(charge_request(b))) for b in shuffled}

    assert in_order == reordered
    assert {"approved"} < set(in_order.values()), "both outcomes should occur at rate 0.5"


async def test_random_mode_with_another_seed_decides_differently() -> None:
    bookings = [f"BK-{i}" for i in range(300)]
    a = FakeProcessor(mode="random", success_rate=0.5, seed=1)
    b = FakeProcessor(mode="random", success_rate=0.5, seed=2)

    outcomes_a = [kind(await a.charge(charge_request(x))) for x in bookings]
    outcomes_b = [kind(await b.charge(charge_request(x))) for x in bookings]

    assert outcomes_a != outcomes_b


@pytest.mark.parametrize(("rate", "seed"), [(0.8, 1), (0.5, 7), (0.2, 42), (0.95, 2026)])
async def test_random_mode_approves_about_the_success_rate(rate: float, seed: int) -> None:
    processor = FakeProcessor(mode="random", success_rate=rate, seed=seed)
    n = 2_000

    outcomes = [await processor.charge(charge_request(f"booking-{i}")) for i in range(n)]

    approved = sum(isinstance(o, Approved) for o in outcomes)

    # 0.045 is over four standard deviations of a 2,000-draw share at p = 0.5.
    assert abs(approved / n - rate) <= 0.045


async def test_random_declines_use_known_decline_codes() -> None:
    processor = FakeProcessor(mode="random", success_rate=0.3, seed=5)

    outcomes = [await processor.charge(charge_request(f"BK-{i}")) for i in range(300)]

    codes = {o.code for o in outcomes if isinstance(o, Declined)}
    assert codes <= KNOWN_DECLINE_CODES
    assert len(codes) > 1, "declines should spread over several codes"


@pytest.mark.parametrize("mode", ["success", "fail", "random"])
async def test_charging_again_with_the_same_key_returns_the_original_outcome(mode: str) -> None:
    processor = FakeProcessor(mode=mode, seed=11)  # type: ignore[arg-type]
    key = uuid.uuid4()

    first = await processor.charge(charge_request("BK-1", key))
    again = [await processor.charge(charge_request("BK-1", key)) for _ in range(5)]

    assert again == [first] * 5
    assert processor.charges == {key: first}
    assert processor.calls == 6


async def test_each_idempotency_key_is_its_own_charge() -> None:
    processor = FakeProcessor(mode="success")
    keys = [uuid.uuid4() for _ in range(3)]

    for key in keys:
        await processor.charge(charge_request("BK-1", key))

    assert set(processor.charges) == set(keys)


async def test_lookup_finds_a_charge_by_its_key_and_nothing_otherwise() -> None:
    processor = FakeProcessor(mode="fail", seed=1)
    request = charge_request()

    assert await processor.lookup(request) is None
    outcome = await processor.charge(request)

    assert await processor.lookup(request) == outcome
    assert await processor.lookup(charge_request()) is None
    assert len(processor.charges) == 1


async def test_the_ledger_is_a_copy() -> None:
    processor = FakeProcessor()
    await processor.charge(charge_request())

    processor.charges.clear()

    assert len(processor.charges) == 1


async def test_latency_delays_each_charge_by_at_least_the_configured_time() -> None:
    processor = FakeProcessor(latency_ms=30)

    started = time.monotonic()
    await processor.charge(charge_request())
    elapsed = time.monotonic() - started

    # The event loop may wake a timer up to its clock resolution early.
    assert elapsed >= 0.030 - 0.002


def test_an_unknown_mode_or_a_rate_outside_0_to_1_is_refused() -> None:
    with pytest.raises(ValueError):
        FakeProcessor(mode="flaky")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FakeProcessor(mode="random", success_rate=1.01)
    with pytest.raises(ValueError):
        FakeProcessor(mode="random", success_rate=-0.1)


def test_without_a_seed_one_is_drawn() -> None:
    seeds = {FakeProcessor(mode="random").seed for _ in range(5)}

    assert len(seeds) > 1
    assert FakeProcessor(mode="random", seed=0).seed == 0


async def test_a_ledger_file_outlives_the_process_and_is_read_back(tmp_path: Path) -> None:
    ledger = tmp_path / "fake-ledger.jsonl"
    first = FakeProcessor(mode="random", seed=7, ledger_path=str(ledger))
    key = uuid.uuid4()
    outcomes = [await first.charge(charge_request(f"BK-{i}")) for i in range(5)]
    charged = await first.charge(charge_request("BK-keyed", key))
    assert await first.charge(charge_request("BK-keyed", key)) == charged  # a replay

    lines = ledger.read_text().splitlines()
    assert len(lines) == 6  # one per charge decided, none per replay
    assert [json.loads(line)["booking_id"] for line in lines][-1] == "BK-keyed"

    # A restart, in another mode: the same key answers what the ledger says, once.
    restarted = FakeProcessor(mode="fail", ledger_path=str(ledger))
    assert await restarted.lookup(charge_request("BK-keyed", key)) == charged
    assert await restarted.charge(charge_request("BK-keyed", key)) == charged
    assert len(ledger.read_text().splitlines()) == 6
    assert len(restarted.charges) == len(outcomes) + 1
