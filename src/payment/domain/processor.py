"""The PaymentProcessor port: what the domain asks of a gateway, and what it may answer."""

from __future__ import annotations

import uuid
from typing import Protocol

import msgspec

from payment.domain.money import Money
from payment.domain.redaction import REDACTED


class ChargeRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One charge, identified at the gateway by its idempotency key."""

    payment_id: uuid.UUID
    booking_id: str
    money: Money
    payment_method: str
    idempotency_key: uuid.UUID
    customer_id: str | None = None

    def __repr__(self) -> str:
        # The payment method is a gateway token: keep it out of reprs and tracebacks.
        return (
            f"ChargeRequest(payment_id={self.payment_id}, booking_id={self.booking_id!r}, "
            f"money={self.money!r}, payment_method={REDACTED})"
        )


class Approved(msgspec.Struct, frozen=True, kw_only=True, tag="approved"):
    """The gateway charged the payment method."""

    provider_reference: str


class Declined(msgspec.Struct, frozen=True, kw_only=True, tag="declined"):
    """The gateway refused the charge; nothing was taken. `code` is the gateway's decline code."""

    code: str
    message: str


ChargeOutcome = Approved | Declined


class RefundRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One refund of a charged payment, identified at the gateway by its own idempotency key."""

    refund_id: uuid.UUID
    payment_id: uuid.UUID
    booking_id: str
    money: Money  # this refund's amount, in the charge's currency
    charge_reference: str  # the gateway's reference of the charge being refunded
    idempotency_key: uuid.UUID


class Refunded(msgspec.Struct, frozen=True, kw_only=True, tag="refunded"):
    """The gateway gave the money back."""

    provider_reference: str


class RefundDeclined(msgspec.Struct, frozen=True, kw_only=True, tag="refund_declined"):
    """The gateway refused the refund; nothing went back. `code` is the gateway's reason."""

    code: str
    message: str
    # True when the request itself was refused as invalid (not a business refusal).
    invalid: bool = False


RefundOutcome = Refunded | RefundDeclined


class ProcessorError(Exception):
    """Base class of the two ways a charge can end without an outcome."""


class ProcessorUnavailable(ProcessorError):
    """The charge was not attempted (or the gateway guarantees it had no effect): safe to retry."""


class ProcessorRateLimited(ProcessorUnavailable):
    """The gateway refused the call for its rate limit (HTTP 429) before executing it.

    Nothing was charged. `retry_after_s` is the gateway's `Retry-After`, when it sent one.
    """

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class OutcomeUnknown(ProcessorError):
    """The request may have reached the gateway: the charge may have happened.

    Never report this as a failure; ask again with the same idempotency key.
    """


class GatewayErrorReplayed(OutcomeUnknown):
    """The gateway answered with the stored error of an earlier request under this
    idempotency key (Stripe replays a 5xx for 24 h): whether that request charged is
    unknown, and no charge under this key can be made until the gateway forgets it.

    A human should look (the payment is flagged at once): docs/operations.md.
    """


class PaymentProcessor(Protocol):
    """A payment gateway.

    Contract: `charge` is idempotent per `request.idempotency_key` — calling it again with
    the same key returns the original outcome and never charges twice; `refund` likewise
    per its refund's own key: never refunds twice.
    """

    name: str

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        """Charge once per idempotency key.

        Returns `Approved` or `Declined`. Raises `ProcessorUnavailable` when the charge was
        certainly not made, `OutcomeUnknown` when it may have been.
        """
        ...

    async def lookup(self, request: ChargeRequest) -> ChargeOutcome | None:
        """The outcome of an earlier charge for this payment, or None if the gateway has none.

        Used to reconcile an unknown outcome where the gateway cannot deduplicate by key.
        Raises `ProcessorUnavailable` when the gateway cannot be asked, `OutcomeUnknown`
        when it holds a charge for this payment whose outcome is not final yet (money may
        still be taken: the caller must neither report a failure nor charge anew).
        """
        ...

    async def refund(self, request: RefundRequest) -> RefundOutcome:
        """Refund once per `request.idempotency_key` (a second call returns the first answer).

        Returns `Refunded` or `RefundDeclined`. Raises `ProcessorUnavailable` when the refund
        was certainly not made, `OutcomeUnknown` when it may have been (never a failure:
        ask again with the same key, or look it up).
        """
        ...

    async def lookup_refund(self, request: RefundRequest) -> RefundOutcome | None:
        """The outcome of an earlier refund with this `refund_id`, or None if the gateway
        holds none. Raises as `lookup` does."""
        ...
