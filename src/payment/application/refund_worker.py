"""The refund worker: settles refunds left pending (waiting for their charge, or unanswered)."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from payment.application.commands import SettleRefunds
from payment.application.refunds import Refunds, SettleResult
from payment.application.rounds import Rounds, Scope, no_scope

log = logging.getLogger(__name__)


class RefundWorker(Rounds):
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
        super().__init__("refund worker", interval_s, log)
        self._refunds = refunds
        self._scope: Scope = scope or no_scope
        self._threshold = timedelta(seconds=threshold_s)
        self._batch = batch

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
                self.count("error")
                log.exception("refund worker: payment %s could not be settled", payment_id)
                continue
            for result in results:
                self.count(result.value)
                if result is not SettleResult.SETTLED:
                    log.info(
                        "refund worker: payment %s -> %s",
                        payment_id,
                        result.value,
                        extra={"payment_id": str(payment_id), "result": result.value},
                    )
        return len(due)
