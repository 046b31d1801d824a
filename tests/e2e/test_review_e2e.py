"""`payment-service review`: a payment flagged for review is resolved without SQL, and the
orchestrator receives its outcome from the running service's relay."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime

import pytest

from payment.adapters.postgres.pool import open_pool
from payment.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from payment.domain.money import Money
from payment.domain.payment import Payment

from .harness import ServiceStack, StackFactory, run_cli

pytestmark = pytest.mark.timeout(240)


async def flag_a_payment(database_url: str, booking_id: str) -> uuid.UUID:
    """Given: a payment whose outcome stayed unknown and was flagged (as the reconciler
    leaves it), stored as the service stores it."""
    now = datetime.now(UTC)
    payment, events = Payment.initiate(
        payment_id=uuid.uuid4(),
        booking_id=booking_id,
        money=Money(amount=4200, currency="EUR"),
        payment_method="pm_card_visa",
        saga_id="saga-review",
        customer_id=None,
        at=now,
    )
    events += payment.flag_for_review(
        detail="outcome unknown for 3600s: needs manual review", at=now
    )
    async with open_pool(database_url, min_size=1, max_size=1) as pool:
        uow_factory = PostgresUnitOfWorkFactory(pool)
        async with uow_factory() as uow:
            await uow.payments.claim_booking(booking_id, payment.id, now)
            await uow.events.append(payment.id, 0, events)
            await uow.commit()
    return payment.id


async def cli(stack: ServiceStack, *args: str) -> tuple[int, str, str]:
    done = await asyncio.to_thread(run_cli, *args, env=stack.env())
    return done.returncode, done.stdout, done.stderr


async def test_a_flagged_payment_is_listed_resolved_and_its_outcome_published(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    booking = f"b-review-{uuid.uuid4().hex[:8]}"
    payment_id = await flag_a_payment(stack.database_url, booking)

    code, out, _ = await cli(stack, "review", "list", "--json")
    assert code == 0
    listed = [json.loads(line) for line in out.splitlines()]
    assert [(r["payment_id"], r["booking_id"], r["amount"]) for r in listed] == [
        (str(payment_id), booking, 4200)
    ]

    # The fake gateway of a fresh process holds no charge: "completed" is not backed.
    code, _, err = await cli(
        stack, "review", "resolve", str(payment_id), "--outcome", "completed",
        "--reason", "ticket OPS-7", "--by", "alice",
    )  # fmt: skip
    assert code == 1
    assert err.startswith("review resolve: refused: the gateway answers not_found")

    code, out, err = await cli(
        stack, "review", "resolve", str(payment_id), "--outcome", "failed",
        "--reason", "ticket OPS-7: no charge in the dashboard", "--by", "alice",
    )  # fmt: skip
    assert code == 0, err
    assert "failed; the gateway answered not_found; recorded by alice" in out

    outcome = await stack.orch.wait_outcome(booking, timeout_s=30)
    assert outcome.kind == "failed"
    assert outcome.data["payment_id"] == str(payment_id)
    assert outcome.data["saga_id"] == "saga-review"

    code, out, _ = await cli(stack, "show", str(payment_id))
    assert code == 0
    assert "PaymentReviewResolved" in out and "alice" in out and "OPS-7" in out

    code, out, _ = await cli(stack, "review", "list")
    assert out.splitlines() == ["0 payments flagged for review"]

    # Once resolved, it cannot be resolved again.
    code, _, err = await cli(
        stack, "review", "resolve", str(payment_id), "--outcome", "failed",
        "--reason", "again", "--by", "bob",
    )  # fmt: skip
    assert code == 1 and "already FAILED" in err


async def test_a_forced_resolution_is_published_and_the_override_recorded(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    booking = f"b-force-{uuid.uuid4().hex[:8]}"
    payment_id = await flag_a_payment(stack.database_url, booking)

    code, out, err = await cli(
        stack, "review", "resolve", str(payment_id), "--outcome", "completed",
        "--reason", "charged on another account, see OPS-8", "--by", "carol", "--force",
    )  # fmt: skip
    assert code == 0, err
    assert "completed (forced against the gateway)" in out

    outcome = await stack.orch.wait_outcome(booking, timeout_s=30)
    assert outcome.kind == "completed"
    assert outcome.data["provider_reference"] == "manual-review"

    code, out, _ = await cli(stack, "show", str(payment_id))
    resolved = next(line for line in out.splitlines() if "PaymentReviewResolved" in line)
    assert "forced=True" in resolved or "forced=true" in resolved.lower(), resolved
