"""Review of a payment flagged for a human: whether the gateway's answer backs an outcome."""

from __future__ import annotations

from typing import NamedTuple

from payment.domain.errors import IllegalTransition, ReviewDisagreesWithGateway
from payment.domain.events import (
    FailureReason,
    GatewayAnswer,
    PaymentCompleted,
    PaymentFailed,
    PaymentReviewResolved,
    ReviewOutcome,
)

# The provider reference of a payment completed by a forced review without one from the
# gateway: the orchestrator sees that no gateway reference backs it.
MANUAL_REFERENCE = "manual-review"
_FAILURE_DETAIL = {
    "declined": "resolved by manual review: declined at the gateway",
    "not_found": "resolved by manual review: no charge at the gateway",
}


class ReviewResolution(NamedTuple):
    """The events of a resolved review, in stream order."""

    resolved: PaymentReviewResolved
    ended: PaymentCompleted | PaymentFailed


def gateway_backs(outcome: ReviewOutcome, answer: GatewayAnswer) -> bool:
    """Whether the gateway's answer backs a review's outcome: approved for completed, a
    decline or no charge at all for failed; an unknown answer backs nothing."""
    if outcome == "completed":
        return answer == "approved"
    return answer in ("declined", "not_found")


def check_resolution(
    *, outcome: ReviewOutcome, resolved_by: str, reason: str, answer: GatewayAnswer, forced: bool
) -> None:
    """Raise unless the resolution names who and why, and the gateway's answer backs its
    outcome (`ReviewDisagreesWithGateway`; `forced` overrides that, and is recorded)."""
    if not resolved_by.strip() or not reason.strip():
        raise IllegalTransition("a review resolution names who resolved it and why")
    if not gateway_backs(outcome, answer) and not forced:
        raise ReviewDisagreesWithGateway(
            f"the gateway answers {answer}, which does not back {outcome}"
        )


def review_failure(answer: GatewayAnswer) -> tuple[FailureReason, str]:
    """The reason and detail of a payment a review ends as failed, given the gateway's answer."""
    reason: FailureReason = "declined" if answer == "declined" else "processor_unavailable"
    detail = _FAILURE_DETAIL.get(
        answer, f"resolved by manual review against the gateway's answer ({answer})"
    )
    return reason, detail
