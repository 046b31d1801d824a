"""The retention job inside the real `payment-service run`: published rows go, the payment stays."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from .harness import StackFactory

pytestmark = pytest.mark.timeout(120)

ONE_SECOND_IN_DAYS = 1 / 86_400


def counts(url: str) -> tuple[int, int, int, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            """
            SELECT (SELECT count(*) FROM payment_outbox WHERE published_at IS NOT NULL),
                   (SELECT count(*) FROM payment_outbox WHERE published_at IS NULL),
                   (SELECT count(*) FROM payment_inbox),
                   (SELECT count(*) FROM payment_events)
            """
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2], row[3]


async def test_run_purges_published_outbox_rows_and_inbox_marks_past_their_window(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(
        PAYMENT_RETENTION_OUTBOX_DAYS=str(ONE_SECOND_IN_DAYS),
        PAYMENT_RETENTION_INBOX_DAYS=str(2 * ONE_SECOND_IN_DAYS),
        PAYMENT_RETENTION_INTERVAL_S="0.2",
    )
    booking = f"ret-{uuid.uuid4().hex[:10]}"
    await stack.orch.request(booking)
    outcome = await stack.orch.wait_outcome(booking)
    assert outcome.kind == "completed"

    async def purged() -> tuple[int, int, int, int]:
        while True:
            now = await asyncio.to_thread(counts, stack.database_url)
            if now[0] == 0 and now[2] == 0:
                return now
            await asyncio.sleep(0.2)

    published, unpublished, inbox, events = await asyncio.wait_for(purged(), 30)
    assert (published, unpublished, inbox) == (0, 0, 0)
    # PaymentInitiated, ChargeStarted, ChargeAttempted, PaymentCompleted: all still there.
    assert events == 4, "the event store is never purged"
    assert "retention: purged" in stack.service.log_text()
