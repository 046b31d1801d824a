"""The gateway's limits against the fake Stripe gateway: 429 with Retry-After, bulkhead, stall.

The real `StripeProcessor` (its HTTP pool sized to the bulkhead) behind the
`LimitedProcessor`, talking to `tests/support/fake_stripe.py`, which counts the most
requests it held at once and answers 429 beyond its rate limit.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from payment.adapters.processors.limits import GatewayLimits, LimitedProcessor
from payment.adapters.processors.stripe import StripeProcessor
from payment.domain.money import Money
from payment.domain.processor import (
    Approved,
    ChargeRequest,
    GatewayErrorReplayed,
    OutcomeUnknown,
)
from support.fake_stripe import API_KEY, FakeStripe


def _request() -> ChargeRequest:
    payment_id = uuid.uuid4()
    return ChargeRequest(
        payment_id=payment_id,
        booking_id=f"bk-{payment_id.hex[:8]}",
        money=Money(amount=1000, currency="EUR"),
        payment_method="pm_card_visa",
        idempotency_key=uuid.uuid4(),
    )


@pytest.fixture
def gateway() -> Iterator[FakeStripe]:
    with FakeStripe(latency_ms=(50, 50), lookup_latency_ms=50) as server:
        yield server


@pytest_asyncio.fixture
async def stripe(gateway: FakeStripe) -> AsyncIterator[StripeProcessor]:
    gateway.control(stall=False, rate_limit=0)
    async with StripeProcessor(
        API_KEY, api_base=gateway.url, name="sandbox", max_connections=5
    ) as processor:
        yield processor


def _high_water(gateway: FakeStripe) -> int:
    return gateway.ledger()[1].get("in_flight_max", 0)


async def test_calls_held_by_the_gateway_never_exceed_the_bulkhead(
    gateway: FakeStripe, stripe: StripeProcessor
) -> None:
    limited = LimitedProcessor(
        stripe, GatewayLimits(max_concurrency=5, max_rate=1000.0), call_timeout_s=10.0
    )

    outcomes = await asyncio.gather(*(limited.charge(_request()) for _ in range(60)))

    assert all(isinstance(o, Approved) for o in outcomes)
    assert _high_water(gateway) <= 5


async def test_a_429_with_retry_after_slows_the_limiter_and_every_charge_goes_through(
    gateway: FakeStripe, stripe: StripeProcessor
) -> None:
    gateway.control(rate_limit=10, retry_after_s=1)
    limited = LimitedProcessor(
        stripe, GatewayLimits(max_concurrency=5, max_rate=40.0), call_timeout_s=10.0
    )
    before = gateway.ledger()[1].get("created", 0)

    requests = [_request() for _ in range(40)]
    outcomes = await asyncio.gather(*(limited.charge(r) for r in requests))

    assert all(isinstance(o, Approved) for o in outcomes)
    intents, stats = gateway.ledger()
    assert stats["rate_limited"] > 0
    assert limited.throttles > 0
    assert limited.rate.rate() < 40.0  # still recovering from the halving
    assert stats["created"] - before == 40  # a refused call charged nothing: one each
    charged = [i["metadata"]["payment_id"] for i in intents]
    assert all(charged.count(str(r.payment_id)) == 1 for r in requests)


async def test_a_stalled_gateway_holds_no_more_calls_than_the_bulkhead_and_recovers(
    gateway: FakeStripe, stripe: StripeProcessor
) -> None:
    limited = LimitedProcessor(
        stripe, GatewayLimits(max_concurrency=4, max_rate=1000.0), call_timeout_s=1.0
    )
    await limited.lookup(_request())  # the dialect probe, before the stall
    gateway.control(stall=True)

    stalled = await asyncio.gather(
        *(limited.charge(_request()) for _ in range(12)), return_exceptions=True
    )
    gateway.control(stall=False)
    after = await limited.charge(_request())

    # Each timed out after its own call timeout, never because it waited for a slot;
    # the gateway held at most 4 of them at once (a caller that hung up no longer counts).
    assert all(isinstance(e, TimeoutError) for e in stalled)
    assert isinstance(after, Approved)
    assert _high_water(gateway) == 4


async def test_a_500_stored_under_the_key_is_told_apart_when_it_is_replayed(
    gateway: FakeStripe, stripe: StripeProcessor
) -> None:
    request = _request()
    gateway.control(fail_with_500=True)
    with pytest.raises(OutcomeUnknown) as first:
        await stripe.charge(request)
    gateway.control(fail_with_500=False)  # the gateway is well again, the key is not

    with pytest.raises(GatewayErrorReplayed):
        await stripe.charge(request)

    assert type(first.value) is OutcomeUnknown  # a fresh 500 may have charged: unknown
    assert isinstance(await stripe.charge(_request()), Approved)  # other keys are fine
