"""A crash between the gateway call and the append (issue 4): no second charge after restart.

The real `run` process charges through the `sandbox` processor against localstripe and
dies at the failpoint `after_charge` (`os._exit`, as a SIGKILL there would): the gateway
holds a PaymentIntent, the event store knows nothing of it, and the offset of
payment.initiated is not committed. After a restart the payment must end with the
gateway's outcome, and localstripe (which ignores idempotency keys, so only the adapter's
lookup by metadata stands between a retry and a second PaymentIntent) must still hold
exactly one PaymentIntent for it.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from payment.application import failpoints
from support.localstripe import API_KEY, LocalStripe, localstripe

from .harness import StackFactory

__all__ = ["localstripe"]

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.filterwarnings(
        "ignore:Use 'content=<...>' to upload raw bytes/text content.:DeprecationWarning"
    ),
]


def intents_of_booking(gateway: LocalStripe, booking: str) -> list[dict[str, object]]:
    return [i for i in gateway.payment_intents() if i["metadata"].get("booking_id") == booking]


async def stream_of(database_url: str, booking: str) -> tuple[str, list[tuple[str, Any]]]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        row = await (
            await conn.execute(
                "SELECT payment_id FROM payment_payments WHERE booking_id = %s", (booking,)
            )
        ).fetchone()
        assert row is not None, f"no payment for {booking}"
        events = await (
            await conn.execute(
                "SELECT event_type, data FROM payment_events WHERE stream_id = %s ORDER BY version",
                (row[0],),
            )
        ).fetchall()
    return str(row[0]), [(etype, data) for etype, data in events]


@pytest.mark.parametrize(
    ("payment_method", "status", "outcome"),
    [
        ("pm_card_visa", "succeeded", "completed"),
        ("pm_card_chargeCustomerFail", "requires_payment_method", "failed"),
    ],
)
async def test_crash_after_the_charge_ends_with_one_charge(
    make_stack: StackFactory,
    localstripe: LocalStripe,
    payment_method: str,
    status: str,
    outcome: str,
) -> None:
    stack = await make_stack(
        PAYMENT_PROCESSOR="sandbox",
        PAYMENT_STRIPE_API_KEY=API_KEY,
        PAYMENT_STRIPE_API_BASE=localstripe.url,
        PAYMENT_RECONCILE_AFTER_S="2",
        PAYMENT_RECONCILE_INTERVAL_S="1",
        **{failpoints.ENV_VAR: "after_charge@1"},
    )
    service = stack.service
    booking = f"crash-{uuid.uuid4().hex[:10]}"
    await stack.orch.request(booking, payment_method=payment_method)

    # The process dies right after the gateway answered, before anything is recorded.
    assert await service.wait_exit(60) == failpoints.EXIT_CODE
    assert "failpoint after_charge: exiting" in service.log_text(current_start_only=True)
    [intent] = intents_of_booking(localstripe, booking)
    assert intent["status"] == status
    payment_id, events = await stream_of(stack.database_url, booking)
    # Only the write-ahead record of the charge (ChargeStarted): its outcome is unknown.
    assert [etype for etype, _ in events] == ["PaymentInitiated", "ChargeStarted"]
    assert intent["metadata"]["payment_id"] == payment_id
    assert not stack.orch.events.terminal(booking)

    service.env.pop(failpoints.ENV_VAR)
    await service.start_ready()
    terminal = await stack.orch.wait_outcome(booking, timeout_s=60)

    assert terminal.kind == outcome, terminal.describe()
    assert terminal.payment_id == payment_id
    assert [i["id"] for i in intents_of_booking(localstripe, booking)] == [intent["id"]]
    if outcome == "completed":
        assert terminal.data["provider_reference"] == intent["id"]
    else:
        assert terminal.data["reason"] == "declined"
    _, events = await stream_of(stack.database_url, booking)
    types = [etype for etype, _ in events]
    assert types[0] == "PaymentInitiated" and types[-1] in ("PaymentCompleted", "PaymentFailed")
    assert len(stack.orch.events.distinct(stack.orch.events.terminal(booking))) == 1
    assert await service.terminate() == 0
