"""The refund worker: settles refunds left pending (waiting for their charge, or unanswered)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from datetime import timedelta

from payment.application.commands import SettleRefunds
from payment.application.refunds import Refunds, SettleResult

log = logging.getLogger(__name__)

# Entered around the settling of one payment's refunds: where an adapter opens a span.
Scope = Callable[[uuid.UUID], AbstractAsyncContextManager[object]]


def _no_scope(payment_id: uuid.UUID) -> AbstractAsyncContextManager[object]:
    return nullcontext()


class RefundWorker:
    """Periodically settles payments whose refunds are due (`PaymentIndex.refunds_due`).

    A refund that waited for its charge is due as soon as the charge settles; one whose
    gateway call did not answer, after `threshold_s`, and then it is looked up before it
    is sent again (same idempotency key). Safe on several instances at once: the gateway
    deduplicates by key and the stream's optimistic lock records one outcome.
    """

    def __init__(
        self,
        refunds: Refunds,
        *,
        threshold_s: float,
        interval_s: float,
        batch: int = 100,
        scope: Scope | None = None,
    ) -> None:
        self._refunds = refunds
        self._scope: Scope = scope or _no_scope
        self._threshold = timedelta(seconds=threshold_s)
        self._interval_s = interval_s
        self._batch = batch
        self.actions: dict[str, int] = {}

    async def run_once(self) -> int:
        """Settle every payment with refunds due now; returns how many were tried."""
        due = await self._refunds.due(self._threshold, self._batch)
        for payment_id in due:
            try:
                async with self._scope(payment_id):
                    results = await self._refunds.settle(
                        SettleRefunds(payment_id=payment_id), look_up_first=True
                    )
            except asyncio.CancelledError:
                raise
            except Exception:  # one payment's failure must not stop the others
                self.actions["error"] = self.actions.get("error", 0) + 1
                log.exception("refund worker: payment %s could not be settled", payment_id)
                continue
            for result in results:
                self.actions[result.value] = self.actions.get(result.value, 0) + 1
                if result is not SettleResult.SETTLED:
                    log.info(
                        "refund worker: payment %s -> %s",
                        payment_id,
                        result.value,
                        extra={"payment_id": str(payment_id), "result": result.value},
                    )
        return len(due)

    async def run(self) -> None:
        """Loop until cancelled; an error in one round is logged and the next round tries again."""
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the outermost loop: log, count, keep going
                self.actions["error"] = self.actions.get("error", 0) + 1
                log.exception("refund worker: round failed; retrying next interval")
            await asyncio.sleep(self._interval_s)
