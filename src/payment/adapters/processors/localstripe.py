"""localstripe's dialect of the Stripe API, for development and tests only.

localstripe (the in-memory Stripe imitation the tests and `payment-service dev` run)
speaks a subset of the API: no search, no idempotency keys, and it refuses parameters
it does not know (such as `automatic_payment_methods`). `StripeProcessor` uses this
dialect only when configured with `dialect="localstripe"`, or when an `api_base` it was
given answers the probe below as localstripe does; never against Stripe itself.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Final

import stripe

from payment.adapters.processors.stripe_answers import matching, text
from payment.adapters.processors.stripe_dialect import STRIPE_API, StripeDialect

if TYPE_CHECKING:
    from stripe.params import PaymentIntentCreateParams


class LocalstripeApi:
    """localstripe: PaymentIntents found by listing them all; keys ignored."""

    name: Final = "localstripe"
    # Where the gateway ignores idempotency keys, looking the payment up first is the
    # only thing standing between a retried charge and a second PaymentIntent.
    honours_idempotency_keys: Final = False

    def complete_params(self, params: PaymentIntentCreateParams) -> None:
        pass  # it refuses automatic_payment_methods

    async def find(
        self, client: stripe.StripeClient, payment_id: uuid.UUID
    ) -> list[stripe.PaymentIntent]:
        # localstripe keeps everything in memory and lists oldest first, so the whole
        # list is walked: a bound would miss the newest.
        found: list[stripe.PaymentIntent] = []
        seen: set[str] = set()
        starting_after: str | None = None
        while True:
            page = await client.v1.payment_intents.list_async(
                {"limit": 100, "starting_after": starting_after}
                if starting_after
                else {"limit": 100}
            )
            found += matching(page.data, payment_id)
            ids = [text(i, "id") for i in page.data]
            last = ids[-1] if ids else None
            # A cursor the server did not recognise restarts the list: stop, don't loop.
            if not page.has_more or last is None or last in seen:
                return found
            seen.update(i for i in ids if i is not None)
            starting_after = last


LOCALSTRIPE_API: Final = LocalstripeApi()


async def detect_dialect(client: stripe.StripeClient) -> StripeDialect:
    """Ask the server at a configured `api_base` whether it has the search API.

    Raises the SDK's error when the server does not answer (nothing was charged).
    """
    try:
        await client.v1.payment_intents.search_async(
            {"query": "metadata['payment_id']:'dialect-probe'", "limit": 1}
        )
    except stripe.InvalidRequestError as exc:
        # localstripe routes /search to "retrieve the intent called search": 404.
        return LOCALSTRIPE_API if exc.http_status == 404 else STRIPE_API
    return STRIPE_API
