"""The Stripe adapter of the PaymentProcessor port: one confirmed PaymentIntent per charge,
one Refund per refund.

What Stripe's answers mean is in stripe_answers.py, amounts in stripe_amounts.py, the
start-up checks in stripe_config.py, scrubbing in stripe_redaction.py and refunds in
stripe_refunds.py. The server's dialect is a strategy (stripe_dialect.py): Stripe's own in
production, localstripe's (localstripe.py) only when configured or detected.
"""

from __future__ import annotations

import logging
import ssl
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Literal, Self

import httpx
import stripe

from payment.adapters.processors.keyed_locks import KeyedLocks
from payment.adapters.processors.localstripe import LOCALSTRIPE_API, detect_dialect
from payment.adapters.processors.stripe_amounts import (
    STRIPE_THREE_DECIMAL,
    STRIPE_TWO_DECIMAL_WHOLE_UNITS,
    STRIPE_ZERO_DECIMAL,
    StripeAmountError,
    stripe_exponent,
    to_stripe_amount,
)
from payment.adapters.processors.stripe_answers import (
    outcome_of,
    outcome_of_error,
    outcome_of_many,
    rate_limited,
    text,
)
from payment.adapters.processors.stripe_config import (
    API_BASE_VARIABLE,
    API_KEY_VARIABLE,
    check_api_base,
    origin,
    validate_stripe_key,
)
from payment.adapters.processors.stripe_dialect import STRIPE_API, Dialect, StripeDialect
from payment.adapters.processors.stripe_redaction import (
    Secret,
    describe,
    install_log_redaction,
    safe_code,
)
from payment.adapters.processors.stripe_refunds import StripeRefunds
from payment.domain.processor import (
    ChargeOutcome,
    ChargeRequest,
    Declined,
    OutcomeUnknown,
    ProcessorUnavailable,
    RefundOutcome,
    RefundRequest,
)

if TYPE_CHECKING:
    from stripe.params import PaymentIntentCreateParams

log = logging.getLogger(__name__)

ProcessorKind = Literal["stripe", "sandbox"]

# Stripe may forget an idempotency key once it is 24 hours old; a create under a forgotten
# key makes a new PaymentIntent. Payments older than this (an hour's margin for the calls
# in progress) are looked up before they are charged (ExecutionPolicy.key_lifetime_s).
IDEMPOTENCY_KEY_LIFETIME_S: Final = 23 * 3600.0

# Stripe's search is eventually consistent: a PaymentIntent usually appears in it within a
# minute. A miss on a younger payment is not "no charge" (ExecutionPolicy.lookup_settle_s).
SEARCH_LAG_S: Final = 60.0

_DIALECTS: Final[dict[str, StripeDialect]] = {"stripe": STRIPE_API, "localstripe": LOCALSTRIPE_API}


class StripeProcessor:
    """Charges through Stripe's PaymentIntents API with the official SDK's async HTTPX client.

    One PaymentIntent is created and confirmed in one call, with the ChargeRequest's
    idempotency key as Stripe's `Idempotency-Key`, so a repeated charge returns the first
    answer. The SDK never retries by itself: retries belong to the application, which
    knows whether the first attempt may have charged.
    """

    def __init__(
        self,
        api_key: str,
        *,
        api_base: str | None = None,
        name: ProcessorKind = "stripe",
        timeout_s: float = 8.0,
        connect_timeout_s: float = 3.0,
        max_connections: int = 100,
        dialect: Dialect | Literal["auto"] = "auto",
        lookup_before_charge: bool | None = None,
    ) -> None:
        """`dialect="auto"` means Stripe itself without `api_base`; with one, the first call
        asks the server whether it has the search API, which localstripe lacks.

        `lookup_before_charge` defaults to on where the server ignores idempotency keys.
        """
        validate_stripe_key(name, api_key)
        check_api_base(name, api_base)
        if dialect not in ("auto", *_DIALECTS):
            raise ValueError(f"unknown Stripe dialect {dialect!r}")
        self.name: str = name
        self._api: StripeDialect | None = (
            _DIALECTS[dialect] if dialect != "auto" else (STRIPE_API if api_base is None else None)
        )
        self._lookup_before_charge = lookup_before_charge
        self._charging: KeyedLocks[uuid.UUID] = KeyedLocks()
        self._api_base = api_base
        self._api_key = Secret(api_key)
        # The application's deadline (ExecutionPolicy.call_timeout_s) is longer, so that
        # this adapter times out first and can tell "never connected" from "no answer".
        self._http = stripe.HTTPXClient(
            timeout=httpx.Timeout(timeout_s, connect=min(connect_timeout_s, timeout_s))
        )
        # The pool matches the calls allowed in flight (LimitedProcessor): the SDK takes
        # no pool limits, so its async client is replaced before it ever connects.
        self._http._client_async = httpx.AsyncClient(
            verify=ssl.create_default_context(cafile=stripe.ca_bundle_path),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            http_client=self._http,
            max_network_retries=0,
        )
        self._refunds = StripeRefunds(self._client, self._resolve_dialect)
        install_log_redaction()

    @property
    def dialect(self) -> Dialect | None:
        """The API dialect of the server, None until an `auto` probe has answered."""
        return None if self._api is None else self._api.name

    def __repr__(self) -> str:
        where = "stripe" if self._api_base is None else origin(self._api_base)
        return f"StripeProcessor(name={self.name!r}, api={where!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self._http.close_async()  # type: ignore[no-untyped-call]  # SDK lacks hints

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        try:
            amount = to_stripe_amount(request.money)
        except StripeAmountError as exc:
            # Nothing was sent; no retry can change the answer.
            return Declined(code="amount_not_representable", message=str(exc))
        api = await self._resolve_dialect()
        lookup_first = self._lookup_before_charge
        if lookup_first is None:
            lookup_first = not api.honours_idempotency_keys
        if not lookup_first:
            return await self._create(request, amount, api)
        # Look-up-then-create is not atomic: two calls for one payment in this process (the
        # consumer's and the reconciler's, after a restart) would both find nothing and
        # create two PaymentIntents at a gateway that ignores idempotency keys. So one at
        # a time per payment: the second finds the first one's intent. (Across instances
        # nothing serialises them; only Stripe's own idempotency keys do.)
        async with self._charging.hold(request.payment_id):
            found = await self._find(request)
            if found:
                known = outcome_of_many(request, found)
                if known is None:
                    raise OutcomeUnknown("stripe: an earlier attempt is not final yet")
                return known
            return await self._create(request, amount, api)

    async def _create(
        self, request: ChargeRequest, amount: int, api: StripeDialect
    ) -> ChargeOutcome:
        params: PaymentIntentCreateParams = {
            "amount": amount,
            "currency": request.money.currency.lower(),
            "payment_method": request.payment_method,
            "confirm": True,
            "metadata": {"payment_id": str(request.payment_id), "booking_id": request.booking_id},
        }
        api.complete_params(params)
        try:
            intent = await self._client.v1.payment_intents.create_async(
                params, {"idempotency_key": str(request.idempotency_key)}
            )
        except stripe.StripeError as exc:
            return self._outcome_of_error(request, exc)
        outcome = outcome_of(intent, request.payment_method)
        if outcome is None:
            status = safe_code(text(intent, "status"), "unknown")
            raise OutcomeUnknown(f"stripe: the PaymentIntent is {status}, not final")
        return outcome

    async def lookup(self, request: ChargeRequest) -> ChargeOutcome | None:
        found = await self._find(request)
        return outcome_of_many(request, found) if found else None

    async def refund(self, request: RefundRequest) -> RefundOutcome:
        """One Stripe Refund on the charge's PaymentIntent per refund (stripe_refunds.py)."""
        return await self._refunds.refund(request)

    async def lookup_refund(self, request: RefundRequest) -> RefundOutcome | None:
        return await self._refunds.lookup_refund(request)

    # -- internals ---------------------------------------------------------------------

    async def _resolve_dialect(self) -> StripeDialect:
        if self._api is not None:
            return self._api
        try:
            api = await detect_dialect(self._client)
        except stripe.StripeError as exc:
            # Nothing was charged; the next call asks again.
            raise ProcessorUnavailable(f"stripe: API not reachable ({describe(exc)})") from None
        log.info("the Stripe API at %s speaks the %s dialect", origin(self._api_base), api.name)
        self._api = api
        return api

    def _outcome_of_error(self, request: ChargeRequest, exc: stripe.StripeError) -> Declined:
        """Map an SDK error on create: a decline, or raise Unavailable / Unknown."""
        return outcome_of_error(request, exc, self._api_key.value)

    async def _find(self, request: ChargeRequest) -> list[stripe.PaymentIntent]:
        """Every PaymentIntent carrying this payment's id in its metadata."""
        api = await self._resolve_dialect()
        try:
            return await api.find(self._client, request.payment_id)
        except stripe.RateLimitError as exc:
            raise rate_limited(exc) from None
        except stripe.StripeError as exc:
            raise ProcessorUnavailable(f"stripe: lookup failed ({describe(exc)})") from None


__all__: Sequence[str] = [
    "API_BASE_VARIABLE",
    "API_KEY_VARIABLE",
    "IDEMPOTENCY_KEY_LIFETIME_S",
    "SEARCH_LAG_S",
    "STRIPE_THREE_DECIMAL",
    "STRIPE_TWO_DECIMAL_WHOLE_UNITS",
    "STRIPE_ZERO_DECIMAL",
    "Dialect",
    "ProcessorKind",
    "StripeAmountError",
    "StripeProcessor",
    "stripe_exponent",
    "to_stripe_amount",
    "validate_stripe_key",
]
