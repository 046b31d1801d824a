"""What handling a payment request or a charge came to, as the consumers count it."""

from __future__ import annotations

import enum


class RequestResult(enum.StrEnum):
    ACCEPTED = "accepted"  # a new payment was initiated
    DUPLICATE = "duplicate"  # this message was handled before: nothing changed
    REJECTED = "rejected"  # broke a rule: payment.failed / invalid_request queued
    REPLAYED = "replayed"  # booking already paid or failed: its outcome queued again
    IN_FLIGHT = "in_flight"  # booking's payment still running: its outcome will follow
    CANCELLED = "cancelled"  # a refund closed the booking first: payment.failed / cancelled


class ExecuteResult(enum.StrEnum):
    DUPLICATE = "duplicate"
    NOT_FOUND = "not_found"
    ALREADY_TERMINAL = "already_terminal"
    COMPLETED = "completed"
    FAILED = "failed"
    UNKNOWN = "unknown"  # outcome unknown: left in flight for the reconciler
    BUSY = "busy"  # another executor or reconciler is charging it and records the outcome
    FLAGGED = "flagged"  # unknown past the review window: flagged for a human
