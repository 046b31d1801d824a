"""Concurrent charges of one payment through the localstripe dialect: one PaymentIntent.

localstripe ignores idempotency keys, so the adapter looks a payment up before charging
it; two calls for the same payment in one process (the consumer's execution and the
reconciler's, right after a restart) must not both find nothing and both create.
"""

from __future__ import annotations

import asyncio

import pytest

from payment.domain.processor import Approved, Declined
from support.localstripe import LocalStripe, charge_request, localstripe, sandbox_processor

__all__ = ["localstripe"]

pytestmark = pytest.mark.filterwarnings(
    "ignore:Use 'content=<...>' to upload raw bytes/text content.:DeprecationWarning"
)


@pytest.mark.parametrize("payment_method", ["pm_card_visa", "pm_card_chargeCustomerFail"])
async def test_concurrent_charges_of_one_payment_create_one_intent(
    localstripe: LocalStripe, payment_method: str
) -> None:
    request = charge_request(payment_method)
    async with sandbox_processor(localstripe.url) as processor:
        outcomes = await asyncio.gather(*(processor.charge(request) for _ in range(4)))
        assert not processor._charging  # no lock left behind

    [intent] = localstripe.intents_for(request.payment_id)
    expected = Approved if payment_method == "pm_card_visa" else Declined
    assert all(isinstance(o, expected) for o in outcomes), outcomes
    if expected is Approved:
        assert {o.provider_reference for o in outcomes if isinstance(o, Approved)} == {intent["id"]}


async def test_charges_of_different_payments_do_not_wait_for_each_other(
    localstripe: LocalStripe,
) -> None:
    requests = [charge_request() for _ in range(3)]
    async with sandbox_processor(localstripe.url) as processor:
        outcomes = await asyncio.gather(*(processor.charge(r) for r in requests))
    assert all(isinstance(o, Approved) for o in outcomes)
    for request in requests:
        assert len(localstripe.intents_for(request.payment_id)) == 1
