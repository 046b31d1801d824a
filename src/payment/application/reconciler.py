"""The reconciler: finds payments in flight past a threshold and resolves them with the gateway."""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import timedelta

from payment.application.commands import ReconcilePayment
from payment.application.handlers import ExecuteResult, ExecutionPolicy, reconcile_payment
from payment.application.ports import Clock, UnitOfWorkFactory
from payment.application.rounds import Rounds, Scope, no_scope
from payment.domain.processor import PaymentProcessor

log = logging.getLogger(__name__)


class Reconciler(Rounds):
    """Asks the gateway about payments whose outcome is still unknown, several at a time.

    Each round claims stale payments oldest first (`PaymentIndex.claim_stale`: instances
    sharing the database get disjoint sets, and a claim leases the payment for one
    threshold), keeps up to `parallelism` reconciliations running, and claims more as they
    finish until nothing stale is left: after an outage the backlog drains as fast as the
    gateway's limits allow (the processor is the shared LimitedProcessor), and an idle
    round costs one query. `scope(payment_id)` is entered around each payment's
    reconciliation (the composition root passes one that continues the payment's trace).
    """

    def __init__(
        self,
        uow_factory: UnitOfWorkFactory,
        processor: PaymentProcessor,
        clock: Clock,
        policy: ExecutionPolicy,
        *,
        threshold_s: float,
        interval_s: float,
        parallelism: int = 1,
        scope: Scope | None = None,
    ) -> None:
        if parallelism < 1:
            raise ValueError("parallelism must be at least 1")
        super().__init__("reconciler", interval_s, log)
        self._uow_factory = uow_factory
        self._processor = processor
        self._clock = clock
        self._policy = policy
        self._threshold = timedelta(seconds=threshold_s)
        self._parallelism = parallelism
        self._scope: Scope = scope or no_scope
        self.running = 0
        self.most_running = 0

    async def run_once(self) -> int:
        """Reconcile every payment in flight past the threshold; returns how many were tried."""
        tried = 0
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                free = self._parallelism - len(running)
                claimed = await self._claim(free) if free > 0 else []
                for payment_id in claimed:
                    running.add(asyncio.create_task(self._reconcile(payment_id)))
                tried += len(claimed)
                if not running:
                    return tried
                _, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _claim(self, limit: int) -> list[uuid.UUID]:
        now = self._clock.now()
        async with self._uow_factory() as uow:
            claimed = await uow.payments.claim_stale(now - self._threshold, limit, now)
            await uow.commit()
        return claimed

    async def _reconcile(self, payment_id: uuid.UUID) -> None:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            async with self._scope(payment_id):
                result = await reconcile_payment(
                    ReconcilePayment(payment_id=payment_id),
                    self._uow_factory,
                    self._processor,
                    self._clock,
                    self._policy,
                )
        except asyncio.CancelledError:
            raise
        except Exception:  # one payment's failure must not stop the others
            self.count("error")
            log.exception("reconciler: payment %s could not be reconciled", payment_id)
            return
        finally:
            self.running -= 1
        self.count(result.value)
        if result is not ExecuteResult.ALREADY_TERMINAL:
            log.info(
                "reconciler: payment %s -> %s",
                payment_id,
                result.value,
                extra={"payment_id": str(payment_id), "result": result.value},
            )
