"""Resolving a payment flagged for review: the gateway is asked first, who and why are kept."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from payment.adapters.memory import MemoryUnitOfWorkFactory
from payment.application.commands import ResolveReview
from payment.application.review import NoSuchPayment, resolve_review
from payment.domain.errors import IllegalTransition, ReviewDisagreesWithGateway
from payment.domain.events import (
    AnyPaymentEvent,
    PaymentCompleted,
    PaymentFailed,
    PaymentReviewResolved,
)
from payment.domain.payment import MANUAL_REFERENCE, Payment, PaymentStatus
from payment.domain.processor import (
    Approved,
    ChargeOutcome,
    ChargeRequest,
    Declined,
    OutcomeUnknown,
)
from support.payments import initiate_payment

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Clock:
    def now(self) -> datetime:
        return AT


class Gateway:
    """Answers every lookup with `answer` (None: no such charge); counts lookups."""

    name = "stripe"

    def __init__(self, answer: ChargeOutcome | Exception | None) -> None:
        self.answer = answer
        self.lookups = 0

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        raise AssertionError("a review never charges")

    async def lookup(self, request: ChargeRequest) -> ChargeOutcome | None:
        self.lookups += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def flagged_payment() -> tuple[Payment, list[AnyPaymentEvent]]:
    payment, events = initiate_payment(booking_id="b-1", amount=1000, at=AT)
    events += payment.flag_for_review(detail="outcome unknown for 3600s", at=AT)
    return payment, events


# -- the aggregate: given a flagged payment, when resolved, then these events -------------


def resolve(payment: Payment, outcome: str, answer: str, *, forced: bool = False) -> Any:
    return payment.resolve_review(
        outcome=outcome,  # type: ignore[arg-type]
        resolved_by="alice",
        reason="ticket OPS-1",
        gateway_answer=answer,  # type: ignore[arg-type]
        gateway_reference="pi_123" if answer == "approved" else None,
        processor="stripe",
        forced=forced,
        at=AT,
    )


def test_a_completed_outcome_backed_by_the_gateway_records_who_why_and_completes() -> None:
    payment, _ = flagged_payment()
    resolved, completed = resolve(payment, "completed", "approved")
    assert isinstance(resolved, PaymentReviewResolved)
    assert (resolved.resolved_by, resolved.reason, resolved.forced) == (
        "alice",
        "ticket OPS-1",
        False,
    )
    assert resolved.gateway_answer == "approved"
    assert isinstance(completed, PaymentCompleted)
    assert completed.provider_reference == "pi_123"
    assert payment.status is PaymentStatus.COMPLETED


@pytest.mark.parametrize(
    ("answer", "reason"), [("declined", "declined"), ("not_found", "processor_unavailable")]
)
def test_a_failed_outcome_backed_by_the_gateway_fails_the_payment(answer: str, reason: str) -> None:
    payment, _ = flagged_payment()
    _, failed = resolve(payment, "failed", answer)
    assert isinstance(failed, PaymentFailed) and failed.reason == reason
    assert failed.detail.startswith("resolved by manual review")


@pytest.mark.parametrize(
    ("outcome", "answer"),
    [
        ("completed", "not_found"),
        ("completed", "unknown"),
        ("failed", "approved"),
        ("failed", "unknown"),
    ],
)
def test_an_outcome_the_gateway_does_not_back_is_refused_and_records_nothing(
    outcome: str, answer: str
) -> None:
    payment, _ = flagged_payment()
    version = payment.version
    with pytest.raises(ReviewDisagreesWithGateway):
        resolve(payment, outcome, answer)
    assert payment.version == version and payment.status is PaymentStatus.INITIATED


def test_a_forced_outcome_is_recorded_as_forced() -> None:
    payment, _ = flagged_payment()
    resolved, completed = resolve(payment, "completed", "not_found", forced=True)
    assert isinstance(resolved, PaymentReviewResolved) and resolved.forced
    assert isinstance(completed, PaymentCompleted)
    assert completed.provider_reference == MANUAL_REFERENCE


def test_only_a_flagged_payment_in_flight_can_be_resolved() -> None:
    payment, _ = initiate_payment(booking_id="b-2", amount=1, payment_method="pm", at=AT)
    with pytest.raises(IllegalTransition, match="not flagged"):
        resolve(payment, "failed", "not_found")
    flagged, _ = flagged_payment()
    resolve(flagged, "failed", "not_found")
    with pytest.raises(IllegalTransition, match="FAILED"):
        resolve(flagged, "failed", "not_found")


def test_replay_rebuilds_the_resolution() -> None:
    payment, events = flagged_payment()
    events += resolve(payment, "completed", "approved")
    replayed = Payment.replay(events)
    assert replayed.status is PaymentStatus.COMPLETED
    assert replayed.review_resolution is not None
    assert replayed.review_resolution.resolved_by == "alice"


# -- the handler: the gateway is asked, the outcome is published through the outbox -------


async def stored(factory: MemoryUnitOfWorkFactory) -> Payment:
    payment, events = flagged_payment()
    async with factory() as uow:
        await uow.payments.claim_booking(payment.booking_id, payment.id, AT)
        await uow.events.append(payment.id, 0, events)
        await uow.commit()
    return payment


def command(payment_id: uuid.UUID, outcome: str, *, force: bool = False) -> ResolveReview:
    return ResolveReview(
        payment_id=payment_id,
        outcome=outcome,
        reason="ticket OPS-1",
        resolved_by="alice",
        force=force,
    )


async def test_resolving_asks_the_gateway_and_queues_the_outcome_for_publication() -> None:
    factory = MemoryUnitOfWorkFactory()
    payment = await stored(factory)
    gateway = Gateway(Approved(provider_reference="pi_9"))
    resolution, found = await resolve_review(
        command(payment.id, "completed"), factory, gateway, Clock()
    )
    assert gateway.lookups == 1
    assert (found.answer, found.reference) == ("approved", "pi_9")
    assert resolution.outcome == "completed"
    async with factory() as uow:
        after = Payment.replay(await uow.events.load(payment.id))
    assert after.status is PaymentStatus.COMPLETED
    queued = [row.message.type for row in factory.db.outbox]
    assert queued == ["payment.completed"]


async def test_a_disagreeing_gateway_refuses_and_nothing_is_stored_or_queued() -> None:
    factory = MemoryUnitOfWorkFactory()
    payment = await stored(factory)
    with pytest.raises(ReviewDisagreesWithGateway):
        await resolve_review(
            command(payment.id, "failed"),
            factory,
            Gateway(Approved(provider_reference="pi")),
            Clock(),
        )
    with pytest.raises(ReviewDisagreesWithGateway):
        await resolve_review(
            command(payment.id, "completed"), factory, Gateway(OutcomeUnknown("down")), Clock()
        )
    async with factory() as uow:
        assert Payment.replay(await uow.events.load(payment.id)).status is PaymentStatus.INITIATED
    assert list(factory.db.outbox) == []


async def test_a_declined_payment_resolved_failed_is_published_as_declined() -> None:
    factory = MemoryUnitOfWorkFactory()
    payment = await stored(factory)
    gateway = Gateway(Declined(code="card_declined", message="no"))
    resolution, _ = await resolve_review(command(payment.id, "failed"), factory, gateway, Clock())
    assert resolution.gateway_answer == "declined"
    assert [row.message.type for row in factory.db.outbox] == ["payment.failed"]


async def test_an_unknown_payment_is_reported_without_asking_the_gateway() -> None:
    gateway = Gateway(None)
    with pytest.raises(NoSuchPayment):
        await resolve_review(
            command(uuid.uuid4(), "failed"), MemoryUnitOfWorkFactory(), gateway, Clock()
        )
    assert gateway.lookups == 0


async def test_card_numbers_in_the_reason_are_masked_before_they_are_stored() -> None:
    factory = MemoryUnitOfWorkFactory()
    payment = await stored(factory)
    cmd = ResolveReview(
        payment_id=payment.id,
        outcome="failed",
        reason="customer said 4242 4242 4242 4242",
        resolved_by="alice",
    )
    resolution, _ = await resolve_review(cmd, factory, Gateway(None), Clock())
    assert "4242 4242" not in resolution.reason
