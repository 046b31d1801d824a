"""The gateway's limits: a bulkhead, an adaptive (AIMD) rate with Retry-After, the call timeout."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from payment.adapters.processors.limits import (
    BURST_FROM_RATE,
    BURST_S,
    AdaptiveRate,
    GatewayLimits,
    LimitedProcessor,
)
from payment.domain.money import Money
from payment.domain.processor import (
    Approved,
    ChargeOutcome,
    ChargeRequest,
    ProcessorRateLimited,
    Refunded,
    RefundOutcome,
    RefundRequest,
)


class FakeTime:
    """A monotonic clock that only moves when a caller sleeps (one caller at a time)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.slept.append(delay)
        self.now += delay


def _request() -> ChargeRequest:
    return ChargeRequest(
        payment_id=uuid.uuid4(),
        booking_id="b-1",
        money=Money(amount=100, currency="EUR"),
        payment_method="pm_card_visa",
        idempotency_key=uuid.uuid4(),
    )


class ScriptedGateway:
    """Answers from a script (an exception is raised), then approves; notes when it was called."""

    name = "scripted"

    def __init__(self, time: FakeTime | None = None, script: list[Exception] | None = None) -> None:
        self.time = time
        self.script = list(script or [])
        self.called_at: list[float] = []

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        self.called_at.append(self.time() if self.time else 0.0)
        if self.script:
            raise self.script.pop(0)
        return Approved(provider_reference="pi_1")

    async def lookup(self, request: ChargeRequest) -> ChargeOutcome | None:
        return await self.charge(request)


class GatedGateway:
    """Holds every call until released; counts calls in flight and their high-water mark."""

    name = "gated"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.in_flight = 0
        self.high_water = 0
        self.calls = 0

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        self.calls += 1
        self.in_flight += 1
        self.high_water = max(self.high_water, self.in_flight)
        try:
            await self.release.wait()
        finally:
            self.in_flight -= 1
        return Approved(provider_reference="pi_1")

    async def lookup(self, request: ChargeRequest) -> ChargeOutcome | None:
        return await self.charge(request)


# -- the rate --------------------------------------------------------------------------


def test_calls_are_spaced_one_over_the_rate_apart() -> None:
    time = FakeTime()
    rate = AdaptiveRate(10.0, clock=time)

    assert [round(rate.reserve(), 6) for _ in range(4)] == [0.0, 0.1, 0.2, 0.3]


def test_at_high_rates_a_batch_goes_at_once_up_to_the_burst_then_is_spaced() -> None:
    time = FakeTime()
    rate = AdaptiveRate(10_000.0, clock=time)
    turn = (1 + BURST_S) / 10_000.0

    delays = [rate.reserve() for _ in range(300)]

    at_once = sum(1 for d in delays if d == 0.0)
    assert at_once == int(BURST_S / turn) + 1  # 244 calls of a batch without a timer
    assert delays[at_once] == pytest.approx(at_once * turn - BURST_S)
    assert delays[-1] - delays[-2] == pytest.approx(turn)
    # Below BURST_FROM_RATE, plain spacing: one call at once, the next 1 / rate later.
    slow = AdaptiveRate(BURST_FROM_RATE / 2, clock=time)
    assert [slow.reserve() for _ in range(2)] == [0.0, pytest.approx(2 / BURST_FROM_RATE)]


def test_at_high_rates_a_throttle_still_pauses_every_call_and_widens_the_turns() -> None:
    time = FakeTime()
    rate = AdaptiveRate(10_000.0, clock=time)
    before = [rate.reserve() for _ in range(100)]

    rate.throttled(1.0)
    after = [rate.reserve() for _ in range(400)]

    assert max(before) < BURST_S
    assert min(after) >= 1.0  # nothing goes before Retry-After has passed
    assert rate.rate() == 5_000.0
    turn = (1 + BURST_S) / 5_000.0  # the halved rate's turns
    assert after[-1] - after[-2] == pytest.approx(turn)
    # When the pause ends, what the halved rate allows at once goes at once.
    assert sum(1 for d in after if d == 1.0) == int(BURST_S / turn) + 1


def _send_times(rate: AdaptiveRate, time: FakeTime, arrivals: list[float]) -> list[float]:
    """When calls arriving at `arrivals` (ascending) are sent: each takes its turn on arrival."""
    sent = []
    for arrival in arrivals:
        time.now = max(time.now, arrival)
        sent.append(time.now + rate.reserve())
    return sorted(sent)


def _most_in_a_second(times: list[float]) -> int:
    """The most calls in any half-open second (less a rounding hair), windows starting at a call."""
    most, end = 0, 0
    for start, first in enumerate(times):
        while end < len(times) and times[end] < first + 1.0 - 1e-9:
            end += 1
        most = max(most, end - start)
    return most


@pytest.mark.parametrize("max_rate", [10.0, 500.0, 1_000.0, 2_000.0, 10_000.0])
def test_no_second_holds_more_calls_than_the_rate_whatever_the_arrivals(max_rate: float) -> None:
    time = FakeTime()
    rate = AdaptiveRate(max_rate, clock=time)
    draw = random.Random(15)
    arrivals: list[float] = []
    at = 0.0
    while len(arrivals) < 6 * max_rate:  # bursts, trickles and pauses, over several seconds
        at += draw.choice([0.0, 0.0, 0.5 / max_rate, 2 / max_rate, 0.3, 1.2])
        arrivals += [at] * draw.choice([1, 3, 50, int(max_rate / 4) or 1])

    sent = _send_times(rate, time, arrivals)

    assert _most_in_a_second(sent) <= max_rate


def test_a_throttle_pauses_until_retry_after_halves_the_rate_and_recovers_linearly() -> None:
    time = FakeTime()
    rate = AdaptiveRate(20.0, clock=time, recovery_s=10.0)

    rate.throttled(3.0)

    assert rate.paused_for() == 3.0
    assert rate.reserve() == 3.0  # nothing goes before Retry-After has passed
    assert rate.rate() == 10.0
    time.now = 5.0  # grows back by max_rate / recovery_s = 2 calls/s each second
    assert rate.rate() == 20.0
    time.now = 2.5
    assert rate.rate() == 15.0


def test_throttles_answering_calls_sent_before_the_decrease_count_once() -> None:
    time = FakeTime()
    rate = AdaptiveRate(20.0, clock=time)

    for _ in range(5):  # five calls in flight all answered 429 at once
        rate.throttled(None)

    assert rate.rate() == 10.0
    assert rate.paused_for() == 1.0  # no Retry-After: a default pause


def test_the_rate_never_falls_below_its_floor() -> None:
    time = FakeTime()
    rate = AdaptiveRate(10.0, clock=time, min_rate=2.0)

    for _ in range(20):
        rate.throttled(0.0)
        time.now += 1.0

    assert rate.rate() >= 2.0


# -- the decorator ---------------------------------------------------------------------


async def test_sequential_calls_never_exceed_the_rate_in_any_second() -> None:
    time = FakeTime()
    gateway = ScriptedGateway(time)
    limited = LimitedProcessor(
        gateway, GatewayLimits(max_concurrency=4, max_rate=10.0), call_timeout_s=None,
        clock=time, sleep=time.sleep,
    )  # fmt: skip

    for _ in range(50):
        assert await limited.charge(_request()) == Approved(provider_reference="pi_1")

    calls = gateway.called_at
    # Half-open one-second windows (less a rounding hair: 10 steps of 0.1 make 0.999…).
    worst = max(sum(1 for t in calls if start <= t < start + 1.0 - 1e-9) for start in calls)
    assert worst <= 10
    assert calls[-1] == pytest.approx(4.9)


async def test_calls_in_flight_never_exceed_the_bulkhead_and_the_rest_wait() -> None:
    gateway = GatedGateway()
    limited = LimitedProcessor(
        gateway, GatewayLimits(max_concurrency=3, max_rate=1e9), call_timeout_s=None
    )

    calls = [asyncio.create_task(limited.charge(_request())) for _ in range(20)]
    for _ in range(50):  # let everything that can run, run
        await asyncio.sleep(0)
    assert (gateway.in_flight, gateway.calls, limited.waiting) == (3, 3, 17)

    gateway.release.set()
    results = await asyncio.gather(*calls)

    assert len(results) == 20
    assert gateway.high_water == 3
    assert limited.in_flight == 0


async def test_waiting_for_a_slot_does_not_count_against_the_call_timeout() -> None:
    gateway = GatedGateway()
    limited = LimitedProcessor(
        gateway, GatewayLimits(max_concurrency=1, max_rate=1e9), call_timeout_s=0.2
    )
    first = asyncio.create_task(limited.charge(_request()))
    second = asyncio.create_task(limited.charge(_request()))

    # The first call holds the only slot past the timeout, and times out itself.
    with pytest.raises(TimeoutError):
        await first
    # The second waited that long for the slot; its own call gets a full timeout.
    gateway.release.set()
    assert await second == Approved(provider_reference="pi_1")


async def test_a_429_is_sent_again_after_retry_after_and_slows_every_caller_down() -> None:
    time = FakeTime()
    gateway = ScriptedGateway(
        time,
        [
            ProcessorRateLimited("429", retry_after_s=2.0),
            ProcessorRateLimited("429", retry_after_s=2.0),
        ],
    )
    limited = LimitedProcessor(
        gateway, GatewayLimits(max_concurrency=4, max_rate=20.0), call_timeout_s=None,
        clock=time, sleep=time.sleep,
    )  # fmt: skip

    assert await limited.charge(_request()) == Approved(provider_reference="pi_1")

    assert limited.throttles == 2
    assert gateway.called_at[1] - gateway.called_at[0] >= 2.0
    assert gateway.called_at[2] - gateway.called_at[1] >= 2.0
    assert limited.rate.rate() < 20.0  # still recovering from two halvings


async def test_a_gateway_that_keeps_refusing_surfaces_the_rate_limit_after_the_retries() -> None:
    time = FakeTime()
    gateway = ScriptedGateway(time, [ProcessorRateLimited("429") for _ in range(10)])
    limited = LimitedProcessor(
        gateway, GatewayLimits(max_concurrency=4, max_rate=20.0), call_timeout_s=None,
        throttle_retries=3, clock=time, sleep=time.sleep,
    )  # fmt: skip

    with pytest.raises(ProcessorRateLimited):
        await limited.lookup(_request())

    assert len(gateway.called_at) == 4


@pytest.mark.parametrize(("header", "expected"), [("3", 3.0), ("0.5", 0.5), ("soon", None)])
def test_stripe_429_is_a_rate_limit_carrying_retry_after(
    header: str, expected: float | None
) -> None:
    import stripe

    from payment.adapters.processors.stripe import StripeProcessor

    processor = StripeProcessor("sk_test_x", name="sandbox", api_base="http://127.0.0.1:9")
    error = stripe.RateLimitError("slow down", http_status=429, headers={"Retry-After": header})

    with pytest.raises(ProcessorRateLimited) as raised:
        processor._outcome_of_error(_request(), error)

    assert raised.value.retry_after_s == expected


class GatedRefunds(GatedGateway):
    """The gated gateway, refunding too: a charge and a refund take the same slots."""

    async def refund(self, request: RefundRequest) -> RefundOutcome:
        await self.charge(_request())
        return Refunded(provider_reference="re_1")

    async def lookup_refund(self, request: RefundRequest) -> RefundOutcome | None:
        return await self.refund(request)


async def test_refunds_share_the_charges_bulkhead() -> None:
    gateway = GatedRefunds()
    limited = LimitedProcessor(
        gateway, GatewayLimits(max_concurrency=3, max_rate=1e9), call_timeout_s=None
    )
    refund = RefundRequest(
        refund_id=uuid.uuid4(),
        payment_id=uuid.uuid4(),
        booking_id="b-1",
        money=Money(amount=50, currency="EUR"),
        charge_reference="pi_1",
        idempotency_key=uuid.uuid4(),
    )

    calls = [asyncio.create_task(limited.charge(_request())) for _ in range(2)]
    calls += [asyncio.create_task(limited.refund(refund)) for _ in range(3)]
    calls += [asyncio.create_task(limited.lookup_refund(refund))]
    for _ in range(50):
        await asyncio.sleep(0)
    assert (gateway.in_flight, limited.waiting) == (3, 3)

    gateway.release.set()
    results = await asyncio.gather(*calls)

    assert results[2:] == [Refunded(provider_reference="re_1")] * 4
    assert gateway.high_water == 3
