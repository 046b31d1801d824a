"""Errors that cross the application boundary, typed so adapters can react to each."""

from __future__ import annotations

import uuid


class ApplicationError(Exception):
    """Base class of application-level errors."""


class ConcurrencyConflict(ApplicationError):
    """Another writer appended to the stream first (optimistic lock lost)."""

    def __init__(self, stream_id: uuid.UUID, expected_version: int) -> None:
        super().__init__(f"stream {stream_id} is past version {expected_version}")
        self.stream_id = stream_id
        self.expected_version = expected_version


class BookingAlreadyClaimed(ApplicationError):
    """The booking already has a payment (one payment per booking)."""

    def __init__(self, booking_id: str) -> None:
        super().__init__("the booking already has a payment")
        self.booking_id = booking_id


class DuplicateMessage(ApplicationError):
    """The inbound message was recorded as handled before: by a concurrent transaction
    (seen at commit), or earlier when a unit of work expected it new (`Inbox.mark_new`)."""


class PaymentConflict(ApplicationError):
    """A re-request whose amount or currency differs from the booking's existing payment."""

    def __init__(self, payment_id: uuid.UUID, detail: str) -> None:
        super().__init__(detail)
        self.payment_id = payment_id
        self.detail = detail


class PaymentNotFound(ApplicationError):
    """No stream exists for the payment id."""


# Lost races with a concurrent writer: the handler retries in a fresh transaction, which
# then sees the winner's state.
RETRYABLE_CONFLICTS = (ConcurrencyConflict, BookingAlreadyClaimed, DuplicateMessage)
