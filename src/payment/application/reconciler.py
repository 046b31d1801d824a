"""The reconciler: finds payments in flight past a threshold and resolves them with the gateway."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from datetime import timedelta

from payment.application.commands import ReconcilePayment
from payment.application.handlers import ExecuteResult, ExecutionPolicy, reconcile_payment
from payment.application.ports import Clock, UnitOfWorkFactory
from payment.domain.processor import PaymentProcessor

log = logging.getLogger(__name__)

# Entered around the reconciliation of one payment: where an adapter opens a trace span.
Scope = Callable[[uuid.UUID], AbstractAsyncContextManager[object]]


def _no_scope(payment_id: uuid.UUID) -> AbstractAsyncContextManager[object]:
    return nullcontext()


class Reconciler:
    """Periodically asks the gateway about payments whose outcome is still unknown.

    Running it on several instances at once is safe: reconciling reuses the payment's
    idempotency key (or looks the charge up first) and the optimistic lock records one
    outcome. `scope(payment_id)` is entered around each payment's reconciliation (the
    composition root passes one that continues the payment's trace).
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
        batch: int = 100,
        scope: Scope | None = None,
    ) -> None:
        self._uow_factory = uow_factory
        self._processor = processor
        self._clock = clock
        self._policy = policy
        self._threshold = timedelta(seconds=threshold_s)
        self._interval_s = interval_s
        self._batch = batch
        self._scope: Scope = scope or _no_scope
        self.actions: dict[str, int] = {}

    async def run_once(self) -> int:
        """Reconcile every payment in flight past the threshold; returns how many were tried."""
        async with self._uow_factory() as uow:
            stale = await uow.payments.in_flight_since(
                self._clock.now() - self._threshold, self._batch
            )
        for payment_id in stale:
            async with self._scope(payment_id):
                try:
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
                    self.actions["error"] = self.actions.get("error", 0) + 1
                    log.exception("reconciler: payment %s could not be reconciled", payment_id)
                    continue
                self.actions[result.value] = self.actions.get(result.value, 0) + 1
                if result is not ExecuteResult.ALREADY_TERMINAL:
                    log.info(
                        "reconciler: payment %s -> %s",
                        payment_id,
                        result.value,
                        extra={"payment_id": str(payment_id), "result": result.value},
                    )
        return len(stale)

    async def run(self) -> None:
        """Loop until cancelled; an error in one round is logged and the next round tries again."""
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the outermost loop: log, count, keep going
                self.actions["error"] = self.actions.get("error", 0) + 1
                log.exception("reconciler: round failed; retrying next interval")
            await asyncio.sleep(self._interval_s)
