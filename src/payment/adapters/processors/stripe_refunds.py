"""Refunds through Stripe's Refunds API: one Refund per refund request, on the PaymentIntent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Final, Literal

import stripe

from payment.domain.processor import (
    OutcomeUnknown,
    ProcessorUnavailable,
    RefundDeclined,
    Refunded,
    RefundOutcome,
    RefundRequest,
)

log = logging.getLogger(__name__)

Dialect = Literal["stripe", "localstripe"]

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
        self,
        client: stripe.StripeClient,
        dialect: Callable[[], Awaitable[Dialect]],
        *,
        describe: Callable[[stripe.StripeError], str],
        safe_code: Callable[[str | None, str], str],
        to_amount: Callable[[RefundRequest], int],
        not_sent: tuple[type[BaseException], ...],
    ) -> None:
        """`describe` an SDK error without secrets; `safe_code` keeps a gateway code only if
        it fits an event field; `to_amount` is the refund in Stripe's units (ValueError if
        it has none); `not_sent` are the transport errors raised before a request left."""
        self._client = client
        self._dialect = dialect
        self._describe = describe
        self._safe_code = safe_code
        self._to_amount = to_amount
        self._not_sent = not_sent
        self._locks: dict[uuid.UUID, tuple[asyncio.Lock, int]] = {}

    async def refund(self, request: RefundRequest) -> RefundOutcome:
        try:
            amount = self._to_amount(request)
        except ValueError as exc:
            return RefundDeclined(code="amount_not_representable", message=str(exc), invalid=True)
        if await self._dialect() == "stripe":
            return await self._create(request, amount)
        async with self._one_at_a_time(request.refund_id):
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
            raise ProcessorUnavailable(
                f"stripe: refund lookup failed ({self._describe(exc)})"
            ) from None
        wanted = str(request.refund_id)
        matching = [r for r in page.data if _metadata(r, "refund_id") == wanted]
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
            status = _text(refund, "status") or "unknown"
            raise OutcomeUnknown(f"stripe: the refund is {status}, not final")
        return outcome

    def _outcome_of_error(self, request: RefundRequest, exc: stripe.StripeError) -> RefundOutcome:
        where = self._describe(exc)
        if isinstance(exc, stripe.IdempotencyError):
            raise OutcomeUnknown(f"stripe: idempotency key reused ({where})") from None
        if isinstance(exc, stripe.InvalidRequestError):
            # Refused before anything was executed (already refunded, amount too large,
            # a charge that is not refundable): no retry changes that.
            log.warning("stripe refused refund %s as invalid (%s)", request.refund_id, where)
            return RefundDeclined(
                code=self._safe_code(exc.code, "invalid_request"),
                message="the gateway refused the refund as invalid",
                invalid=True,
            )
        if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
            raise ProcessorUnavailable(f"stripe: credentials rejected ({where})") from None
        if isinstance(exc, stripe.RateLimitError):
            raise ProcessorUnavailable(f"stripe: rate limited ({where})") from None
        if isinstance(exc, stripe.APIConnectionError) and isinstance(exc.__cause__, self._not_sent):
            raise ProcessorUnavailable(f"stripe: could not connect ({where})") from None
        # Lost connection after sending, 409, 5xx: the refund may have been made.
        raise OutcomeUnknown(f"stripe: no usable answer to a refund ({where})") from None

    def _outcome_of(self, refund: stripe.Refund) -> RefundOutcome | None:
        """The final outcome a Refund records, or None while it can still change."""
        reference = _text(refund, "id")
        status = _text(refund, "status")
        if reference is None:
            return None
        if status == "succeeded":
            return Refunded(provider_reference=reference)
        if status in _FAILED_STATUSES:
            return RefundDeclined(
                code=self._safe_code(_text(refund, "failure_reason"), "refund_failed"),
                message=f"the refund {status}",
            )
        return None

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, refund_id: uuid.UUID) -> AsyncIterator[None]:
        lock, users = self._locks.get(refund_id, (asyncio.Lock(), 0))
        self._locks[refund_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[refund_id]
            if users == 1:
                del self._locks[refund_id]
            else:
                self._locks[refund_id] = (lock, users - 1)


def _metadata(refund: stripe.Refund, key: str) -> str | None:
    metadata = getattr(refund, "metadata", None)
    return None if metadata is None else _text(metadata, key)


def _text(obj: object, name: str) -> str | None:
    value = getattr(obj, name, None)
    return value if isinstance(value, str) else None


__all__: Sequence[str] = ["StripeRefunds"]
