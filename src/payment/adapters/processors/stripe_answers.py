"""What Stripe's answers mean for a charge: PaymentIntents and SDK errors as outcomes.

A PaymentIntent's status is final (approved, declined) or still moving (None, or
`OutcomeUnknown` when money may still be taken); an SDK error is a decline, or raises
`ProcessorUnavailable` (nothing was charged), `ProcessorRateLimited` or `OutcomeUnknown`
(the charge may have happened). Nothing here sends a request.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final

import httpx
import stripe

from payment.adapters.processors.stripe_config import API_KEY_VARIABLE
from payment.adapters.processors.stripe_redaction import describe, safe_code, scrub
from payment.domain.processor import (
    Approved,
    Declined,
    GatewayErrorReplayed,
    OutcomeUnknown,
    ProcessorRateLimited,
    ProcessorUnavailable,
)

if TYPE_CHECKING:
    from payment.domain.processor import ChargeOutcome, ChargeRequest

log = logging.getLogger("payment.adapters.processors.stripe")

# Errors raised before the request left this process: the charge cannot have happened.
NOT_SENT: Final = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
)

_APPROVED_STATUSES: Final = frozenset({"succeeded", "requires_capture"})


def outcome_of_error(request: ChargeRequest, exc: stripe.StripeError, api_key: str) -> Declined:
    """Map an SDK error on create: a decline, or raise Unavailable / Unknown."""
    where = describe(exc)
    if isinstance(exc, stripe.RateLimitError):
        # Stripe rejects rate-limited and lock-contended requests before executing them.
        raise rate_limited(exc) from None
    raise_for_common_errors(exc, where)
    secrets = (request.payment_method, api_key)
    if isinstance(exc, stripe.CardError):
        code = text(exc.error, "decline_code") or exc.code
        return Declined(
            code=safe_code(code, "card_declined"),
            message=scrub(exc.user_message or "the card was declined", *secrets),
        )
    if isinstance(exc, stripe.InvalidRequestError):
        # Validation failed before anything executed, and Stripe keeps no idempotent
        # result for it: retrying is pointless, and the charge did not happen.
        log.warning("stripe refused payment %s as invalid (%s)", request.payment_id, where)
        return Declined(
            code=safe_code(exc.code, "invalid_request"),
            message=scrub(exc.user_message or "invalid request", *secrets),
        )
    if isinstance(exc, stripe.APIConnectionError):
        raise OutcomeUnknown(
            f"stripe: connection lost after sending the request ({where})"
        ) from None
    if _replayed(exc) and (exc.http_status or 0) >= 500:
        # Stripe stores a key's first answer, a 500 included, and replays it for 24 h.
        raise GatewayErrorReplayed(
            f"stripe: replays the stored error of this idempotency key ({where})"
        ) from None
    # 409 (a request with the same key in flight), 5xx, unreadable bodies: the request
    # reached Stripe or something in front of it, and may have been executed.
    raise OutcomeUnknown(f"stripe: no usable answer ({where})") from None


def raise_for_common_errors(exc: stripe.StripeError, where: str) -> None:
    """The SDK errors a charge and a refund mean alike: raise for them, return otherwise.

    A reused idempotency key (the earlier request may have been executed: unknown),
    rejected credentials and a request that never left this process (nothing happened:
    unavailable).
    """
    if isinstance(exc, stripe.IdempotencyError):
        # The key was used before with other parameters: that earlier request may
        # have been executed. Only a lookup can tell.
        raise OutcomeUnknown(f"stripe: idempotency key reused ({where})") from None
    if isinstance(exc, stripe.AuthenticationError | stripe.PermissionError):
        log.error("stripe rejected the credentials (%s): check %s", where, API_KEY_VARIABLE)
        raise ProcessorUnavailable(f"stripe: credentials rejected ({where})") from None
    if isinstance(exc, stripe.APIConnectionError) and isinstance(exc.__cause__, NOT_SENT):
        raise ProcessorUnavailable(f"stripe: could not connect ({where})") from None


def outcome_of_many(
    request: ChargeRequest, intents: Sequence[stripe.PaymentIntent]
) -> ChargeOutcome | None:
    """The outcome of every PaymentIntent found for one payment (usually one)."""
    if len(intents) > 1:
        # Only a gateway that ignores idempotency keys lets this happen; money may
        # have been taken twice, which needs a human.
        log.warning(
            "payment %s has %d PaymentIntents at stripe: %s",
            request.payment_id,
            len(intents),
            ", ".join(text(i, "id") or "?" for i in intents),
        )
    outcomes = [outcome_of(i, request.payment_method) for i in intents]
    # Money taken wins; then a charge still moving; a decline only when all are final.
    for outcome in outcomes:
        if isinstance(outcome, Approved):
            return outcome
    processing = [text(i, "id") or "?" for i in intents if text(i, "status") == "processing"]
    if processing:
        # Money may still be taken: neither "no charge" (which would let a failure be
        # reported, or a new intent be created once the key has expired) nor final.
        raise OutcomeUnknown(f"stripe: PaymentIntent {processing[0]} is still processing")
    if any(o is None for o in outcomes):
        return None
    return outcomes[0]


def outcome_of(intent: stripe.PaymentIntent, *secrets: str) -> ChargeOutcome | None:
    """The final outcome a PaymentIntent records, or None while it can still change."""
    status = text(intent, "status")
    reference = text(intent, "id")
    if reference is None:
        return None
    if status in _APPROVED_STATUSES:
        return Approved(provider_reference=reference)
    if status == "requires_payment_method":
        error: object = getattr(intent, "last_payment_error", None)
        if error is None:
            return None  # created but never confirmed
        return Declined(
            code=safe_code(text(error, "decline_code") or text(error, "code"), "card_declined"),
            message=scrub(text(error, "message") or "the payment was declined", *secrets),
        )
    if status == "requires_action":
        # Customer authentication (3-D Secure) is needed, and no customer is present
        # to give it: for this service, the charge was refused.
        return Declined(
            code="authentication_required",
            message="the payment method requires customer authentication",
        )
    if status == "canceled":
        return Declined(
            code=safe_code(text(intent, "cancellation_reason"), "canceled"),
            message="the PaymentIntent was canceled",
        )
    # processing, requires_confirmation: not final.
    return None


def matching(
    objects: Iterable[stripe.PaymentIntent], payment_id: uuid.UUID
) -> list[stripe.PaymentIntent]:
    """The PaymentIntents whose metadata names this payment."""
    wanted = str(payment_id)
    return [i for i in objects if metadata(i, "payment_id") == wanted]


def metadata(obj: object, key: str) -> str | None:
    """A metadata value of a Stripe object (PaymentIntent, Refund), None if absent."""
    values = getattr(obj, "metadata", None)
    return None if values is None else text(values, key)


def text(obj: object, name: str) -> str | None:
    """A string field of a Stripe object, None when absent or not a string."""
    # The SDK raises AttributeError for fields a response leaves out (localstripe leaves
    # out many, Stripe a few): absent and null mean the same here.
    value = getattr(obj, name, None)
    return value if isinstance(value, str) else None


def rate_limited(exc: stripe.RateLimitError) -> ProcessorRateLimited:
    return ProcessorRateLimited(
        f"stripe: rate limited ({describe(exc)})", retry_after_s=_retry_after(exc)
    )


def _replayed(exc: stripe.StripeError) -> bool:
    headers = exc.headers or {}
    return any(k.lower() == "idempotent-replayed" and v == "true" for k, v in headers.items())


def _retry_after(exc: stripe.StripeError) -> float | None:
    """The `Retry-After` of an answer, in seconds (delta-seconds form only)."""
    headers = exc.headers or {}
    raw = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    try:
        seconds = float(raw) if raw is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds <= 3600 else None
