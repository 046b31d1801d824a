"""Domain rule violations: typed errors raised by the aggregate and value objects."""

from __future__ import annotations

from typing import Literal


class DomainError(Exception):
    """Base class of every rule the domain refuses to break."""


class InvalidMoney(DomainError):
    """An amount or currency that the domain does not accept."""


class IllegalTransition(DomainError):
    """A command that the payment's current state does not allow; nothing is recorded."""


class ChargeInProgress(IllegalTransition):
    """Another caller started a charge of this payment and its lease is still running."""


class ReviewDisagreesWithGateway(IllegalTransition):
    """A review resolution that contradicts what the gateway says (allowed only if forced)."""


class RefundRefused(DomainError):
    """A refund the payment cannot take; nothing is recorded. `reason` is the contract's."""

    reason: Literal["not_charged", "over_refund", "invalid_request"] = "invalid_request"


class NotCharged(RefundRefused):
    """A refund of a payment that ended without a charge."""

    reason = "not_charged"


class OverRefund(RefundRefused):
    """A refund that would take the refunded total past the amount charged."""

    reason = "over_refund"


class StreamMismatch(DomainError):
    """An event applied to the wrong stream or out of version order."""


class UnknownEventVersion(DomainError):
    """A stored event whose schema version this code cannot read (written by a later
    release, or by none), or an older version without the upcasters to the current one."""

    def __init__(self, event_type: str, version: int, detail: str) -> None:
        super().__init__(f"stored {event_type} of schema version {version}: {detail}")
        self.event_type = event_type
        self.version = version
