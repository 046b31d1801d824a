"""The API dialect a Stripe server speaks: Stripe's own, as the production adapter uses it.

`StripeProcessor` holds one `StripeDialect` and asks it the few things that differ
between servers: how a payment's PaymentIntents are found, what a create carries, and
whether the server honours idempotency keys. Stripe's is `STRIPE_API`; the test server
localstripe's (localstripe.py) is used only when configured or detected at an
`api_base` that lacks search.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Final, Literal, Protocol

import stripe

from payment.adapters.processors.stripe_answers import matching

if TYPE_CHECKING:
    from stripe.params import PaymentIntentCreateParams

Dialect = Literal["stripe", "localstripe"]


class StripeDialect(Protocol):
    """What differs between Stripe and a server imitating it."""

    @property
    def name(self) -> Dialect: ...

    @property
    def honours_idempotency_keys(self) -> bool:
        """False: look up before creating, one call per payment (or refund) at a time."""
        ...

    def complete_params(self, params: PaymentIntentCreateParams) -> None:
        """Add to a PaymentIntent create what this server needs (or leave it as it is)."""
        ...

    async def find(
        self, client: stripe.StripeClient, payment_id: uuid.UUID
    ) -> list[stripe.PaymentIntent]:
        """Every PaymentIntent carrying this payment's id in its metadata."""
        ...


class StripeApi:
    """Stripe itself: search by metadata, idempotency keys honoured for 24 hours."""

    name: Final = "stripe"
    honours_idempotency_keys: Final = True

    def complete_params(self, params: PaymentIntentCreateParams) -> None:
        # A server-side charge has no page to return to: without this, Stripe demands
        # a return_url for the redirect-based methods enabled in the Dashboard.
        params["automatic_payment_methods"] = {"enabled": True, "allow_redirects": "never"}

    async def find(
        self, client: stripe.StripeClient, payment_id: uuid.UUID
    ) -> list[stripe.PaymentIntent]:
        # Search is eventually consistent (usually under a minute behind): a miss here is
        # covered by charging again with the same idempotency key, which Stripe honours.
        result = await client.v1.payment_intents.search_async(
            {"query": f"metadata['payment_id']:'{payment_id}'", "limit": 100}
        )
        return matching(result.data, payment_id)


STRIPE_API: Final = StripeApi()
