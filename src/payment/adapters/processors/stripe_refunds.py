"""Refunds through Stripe's Refunds API: one Refund per refund request, on the PaymentIntent."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final

import stripe

from payment.adapters.processors.keyed_locks import KeyedLocks
from payment.adapters.processors.stripe_amounts import to_stripe_amount
from payment.adapters.processors.stripe_answers import metadata, raise_for_common_errors, text
from payment.adapters.processors.stripe_dialect import StripeDialect
from payment.adapters.processors.stripe_redaction import describe, safe_code
from payment.domain.processor import OutcomeUnknown, ProcessorUnavailable, RefundDeclined, Refunded

if TYPE_CHECKING:
    from payment.domain.processor import RefundOutcome, RefundRequest

log = logging.getLogger(__name__)

# Final states of a Stripe Refund (docs.stripe.com/api/refunds/object#refund_object-status);
# `pending` and `requires_action` may still go either way.
_FAILED_STATUSES: Final = frozenset({"failed", "canceled"})


class StripeRefunds:
    """The refund half of `StripeProcessor`, on its client.

    Each refund is created with its own idempotency key and carries its refund id in its
    metadata, so that it can be found again. On a gateway that ignores idempotency keys
    (localstripe) the refund is looked up before it is created, one call per refund at a
    time, as charges are.
    """

    def __init__(
        self, client: stripe.StripeClient, dialect: Callable[[], Awaitable[StripeDialect]]
    ) -> None:
        """`dialect` resolves the server's dialect (once asked, it answers at once)."""
        self._client = client
        self._dialect = dialect
        self._locks: KeyedLocks[uuid.UUID] = KeyedLocks()

    async def refund(self, request: RefundRequest) -> RefundOutcome:
        try:
            amount = to_stripe_amount(request.money)
        except ValueError as exc:
            return RefundDeclined(code="amount_not_representable", message=str(exc), invalid=True)
        if (await self._dialect()).honours_idempotency_keys:
            return await self._create(request, amount)
        async with self._locks.hold(request.refund_id):
            found = await self.lookup_refund(request)
            if found is not None:
                return found
            return await self._create(request, amount)

    async def lookup_refund(self, request: RefundRequest) -> RefundOutcome | None:
        try:
            page = await self._client.v1.refunds.list_async(
                {"payment_intent": request.charge_reference, "limit": 100}
            )
        except stripe.StripeError as exc:
            if isinstance(exc, stripe.InvalidRequestError) and exc.http_status == 404:
                return None  # no such PaymentIntent: it holds no refund
            raise ProcessorUnavailable(f"stripe: refund lookup failed ({describe(exc)})") from None
        wanted = str(request.refund_id)
        matching = [r for r in page.data if metadata(r, "refund_id") == wanted]
        if not matching:
            return None
        outcomes = [self._outcome_of(r) for r in matching]
        for outcome in outcomes:
            if isinstance(outcome, Refunded):
                return outcome
        if any(o is None for o in outcomes):
            raise OutcomeUnknown("stripe: the refund is still pending")
        return outcomes[0]

    async def _create(self, request: RefundRequest, amount: int) -> RefundOutcome:
        try:
            refund = await self._client.v1.refunds.create_async(
                {
                    "payment_intent": request.charge_reference,
                    "amount": amount,
                    "metadata": {
                        "refund_id": str(request.refund_id),
                        "payment_id": str(request.payment_id),
                        "booking_id": request.booking_id,
                    },
                },
                {"idempotency_key": str(request.idempotency_key)},
            )
        except stripe.StripeError as exc:
            return self._outcome_of_error(request, exc)
        outcome = self._outcome_of(refund)
        if outcome is None:
            status = text(refund, "status") or "unknown"
            raise OutcomeUnknown(f"stripe: the refund is {status}, not final")
        return outcome

    def _outcome_of_error(self, request: RefundRequest, exc: stripe.StripeError) -> RefundOutcome:
        where = describe(exc)
        if isinstance(exc, stripe.RateLimitError):
            raise ProcessorUnavailable(f"stripe: rate limited ({where})") from None
        raise_for_common_errors(exc, where)
        if isinstance(exc, stripe.InvalidRequestError):
            # Refused before anything was executed (already refunded, amount too large,
            # a charge that is not refundable): no retry changes that.
            log.warning("stripe refused refund %s as invalid (%s)", request.refund_id, where)
            return RefundDeclined(
                code=safe_code(exc.code, "invalid_request"),
                message="the gateway refused the refund as invalid",
                invalid=True,
            )
        # Lost connection after sending, 409, 5xx: the refund may have been made.
        raise OutcomeUnknown(f"stripe: no usable answer to a refund ({where})") from None

    def _outcome_of(self, refund: stripe.Refund) -> RefundOutcome | None:
        """The final outcome a Refund records, or None while it can still change."""
        reference = text(refund, "id")
        status = text(refund, "status")
        if reference is None:
            return None
        if status == "succeeded":
            return Refunded(provider_reference=reference)
        if status in _FAILED_STATUSES:
            return RefundDeclined(
                code=safe_code(text(refund, "failure_reason"), "refund_failed"),
                message=f"the refund {status}",
            )
        return None


__all__: Sequence[str] = ["StripeRefunds"]
