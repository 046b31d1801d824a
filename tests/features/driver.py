"""Drivers behind the Gherkin steps: the service seen from the saga, in memory or on a real stack.

Steps talk only to a `PaymentsDriver`: they send requests and read what the service
published, as the orchestrator would. `MemoryDriver` runs the application handlers on the
in-memory adapters (the default, milliseconds per scenario); a real-stack driver
(PostgreSQL, the broker and the `payment-service run` process) implements the same
protocol so that the same scenarios run end to end.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NotRequired, Protocol, TypedDict, TypeVar, Unpack

from payment.adapters.memory import MemoryUnitOfWorkFactory
from payment.adapters.processors.fake import FakeProcessor
from payment.application.commands import (
    ExecutePayment,
    InboundRef,
    ReconcilePayment,
    RefundPayment,
    RequestPayment,
    SettleRefunds,
)
from payment.application.errors import PaymentConflict
from payment.application.handlers import (
    ExecutionPolicy,
    execute_payment,
    reconcile_payment,
    request_payment,
)
from payment.application.refunds import RefundResult, Refunds
from payment.domain.processor import (
    ChargeOutcome,
    ChargeRequest,
    OutcomeUnknown,
    Refunded,
    RefundOutcome,
    RefundRequest,
)

T = TypeVar("T")

SAGA_SOURCE = "booking-saga"
SERVICE_SOURCE = "payment-service"
TERMINAL_TYPES = ("payment.completed", "payment.failed")
REFUND_TYPES = ("payment.refunded", "payment.refund_failed")


@dataclass(frozen=True)
class ProcessorSetup:
    """The gateway the service is started with (PAYMENT_FAKE_* in the real stack)."""

    mode: Literal["success", "fail", "random"] = "success"
    success_rate: float = 0.8
    seed: int | None = None


@dataclass(frozen=True)
class Published:
    """One message the service published, as the orchestrator receives it."""

    type: str  # CloudEvents type: payment.initiated, payment.completed, payment.failed
    event_id: str  # ce_id, identical on every re-publication of the same event
    key: str  # Kafka key: the payment id, or the booking id when no payment exists
    data: dict[str, Any]  # the JSON data

    @property
    def is_outcome(self) -> bool:
        return self.type in TERMINAL_TYPES


class RequestFields(TypedDict):
    """A `saga.request_payment`'s fields besides the booking id."""

    amount: int
    currency: str
    payment_method: str
    saga_id: NotRequired[str | None]
    customer_id: NotRequired[str | None]


class PaymentsDriver(Protocol):
    """The service under test, as the booking saga sees it.

    Every method blocks until the service has done what it implies; a real-stack driver
    waits with a timeout where the memory driver simply runs the handlers.
    """

    def start(self, processor: ProcessorSetup) -> None:
        """(Re)start the service with an empty store and this processor configuration."""
        ...

    def request(self, booking_id: str, **fields: Unpack[RequestFields]) -> str:
        """Send one `saga.request_payment` with a new `ce_id`; returns that `ce_id`."""
        ...

    def redeliver(self, message_id: str) -> None:
        """Deliver an earlier request again: the same `ce_source`, `ce_id` and data."""
        ...

    def deliver_initiated(self) -> None:
        """Let the service act on every `payment.initiated` published so far.

        Returns once each such payment has an outcome or was left in flight with an
        unknown outcome (memory: delivers them to the executor; a real stack waits for
        its own consumer to have handled them).
        """
        ...

    def lose_next_response(self) -> None:
        """The gateway makes the next charge, but its answer never reaches the service."""
        ...

    def reconcile(self) -> None:
        """Run the reconciler over every payment still in flight, and wait for it."""
        ...

    def published(self, booking_id: str) -> list[Published]:
        """Everything published about the booking so far, in publication order."""
        ...

    def outcome_for(self, booking_id: str) -> Published | None:
        """The latest `payment.completed` or `payment.failed` of the booking, if any."""
        ...

    def charges_for(self, booking_id: str) -> int:
        """How many distinct charges the gateway made for the booking."""
        ...

    def dead_lettered(self, message_id: str) -> bool:
        """Whether the request with this `ce_id` was set aside on `payment.dead_letter`."""
        ...

    def refund(self, booking_id: str, *, amount: int | None, saga_id: str | None = None) -> str:
        """Send one `saga.refund_payment` (amount None: all that is left) with a new
        `ce_id`, and return it once the service has answered it."""
        ...

    def refunded_at_gateway(self, booking_id: str) -> int:
        """The total the gateway itself refunded for the booking, in minor units."""
        ...

    def close(self) -> None:
        """Stop the service and release what the driver holds."""
        ...


class _FakeClock:
    """Service time that moves only when the driver says so."""

    def __init__(self) -> None:
        self.current = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.current

    def advance(self, seconds: float) -> None:
        self.current += timedelta(seconds=seconds)


class _ObservedGateway:
    """The fake processor, watched: which charges reached it, and an answer that can get lost."""

    def __init__(self, fake: FakeProcessor) -> None:
        self._fake = fake
        self.name = fake.name
        self.lose_next = 0
        self.keys_by_booking: defaultdict[str, set[uuid.UUID]] = defaultdict(set)
        self.refunds_by_booking: defaultdict[str, dict[uuid.UUID, int]] = defaultdict(dict)

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        outcome = await self._fake.charge(request)
        # The fake is idempotent per key: one key that reached it is one charge.
        self.keys_by_booking[request.booking_id].add(request.idempotency_key)
        if self.lose_next:
            self.lose_next -= 1
            raise OutcomeUnknown("the gateway's answer was lost")
        return outcome

    async def lookup(self, request: ChargeRequest) -> ChargeOutcome | None:
        return await self._fake.lookup(request)

    async def refund(self, request: RefundRequest) -> RefundOutcome:
        outcome = await self._fake.refund(request)
        if isinstance(outcome, Refunded):
            # Idempotent per key: a key seen again is the same refund.
            self.refunds_by_booking[request.booking_id][request.idempotency_key] = (
                request.money.amount
            )
        return outcome

    async def lookup_refund(self, request: RefundRequest) -> RefundOutcome | None:
        return await self._fake.lookup_refund(request)


class MemoryDriver:
    """The application handlers on the in-memory adapters, driven synchronously."""

    # Tiny backoffs keep retries at milliseconds; unknown outcomes are never retried blindly.
    policy = ExecutionPolicy(
        call_timeout_s=1.0,
        max_attempts=3,
        backoff_initial_s=0.001,
        backoff_max_s=0.002,
        review_after_s=3600.0,
    )
    reconcile_after_s = 60.0

    def __init__(self, processor: ProcessorSetup | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self.start(processor or ProcessorSetup())

    def start(self, processor: ProcessorSetup) -> None:
        self.clock = _FakeClock()
        self.uow_factory = MemoryUnitOfWorkFactory()
        self.gateway = _ObservedGateway(
            FakeProcessor(
                mode=processor.mode, success_rate=processor.success_rate, seed=processor.seed
            )
        )
        self._requests: dict[str, RequestPayment] = {}
        self._dead_letters: set[str] = set()
        self._executed: set[uuid.UUID] = set()
        self._by_booking: defaultdict[str, list[Published]] = defaultdict(list)
        self._seen_rows = 0

    def request(self, booking_id: str, **fields: Unpack[RequestFields]) -> str:
        message_id = str(uuid.uuid4())
        self._requests[message_id] = RequestPayment(
            inbound=InboundRef(source=SAGA_SOURCE, message_id=message_id),
            booking_id=booking_id,
            **fields,
        )
        self.redeliver(message_id)
        return message_id

    def redeliver(self, message_id: str) -> None:
        try:
            self._run(request_payment(self._requests[message_id], self.uow_factory, self.clock))
        except PaymentConflict:
            # What the request consumer does with it: set it aside on the dead-letter topic.
            self._dead_letters.add(message_id)

    def deliver_initiated(self) -> None:
        for record in list(self.uow_factory.db.outbox):
            message = record.message
            if message.type != "payment.initiated":
                continue
            payment_id = uuid.UUID(message.key)
            if payment_id in self._executed:
                continue
            self._executed.add(payment_id)
            command = ExecutePayment(
                inbound=InboundRef(source=SERVICE_SOURCE, message_id=str(message.event_id)),
                payment_id=payment_id,
            )
            self._run(
                execute_payment(command, self.uow_factory, self.gateway, self.clock, self.policy)
            )

    def lose_next_response(self) -> None:
        self.gateway.lose_next += 1

    def reconcile(self) -> None:
        self.clock.advance(self.reconcile_after_s)
        threshold = self.clock.now() - timedelta(seconds=self.reconcile_after_s / 2)

        async def run() -> None:
            async with self.uow_factory() as uow:
                stale = await uow.payments.in_flight_since(threshold, 1_000)
            for payment_id in stale:
                await reconcile_payment(
                    ReconcilePayment(payment_id=payment_id),
                    self.uow_factory,
                    self.gateway,
                    self.clock,
                    self.policy,
                )

        self._run(run())

    def published(self, booking_id: str) -> list[Published]:
        # The outbox only grows: index the rows committed since the last look.
        rows = self.uow_factory.db.outbox
        for record in rows[self._seen_rows :]:
            message = record.message
            data = json.loads(message.data)
            self._by_booking[data["booking_id"]].append(
                Published(message.type, str(message.event_id), message.key, data)
            )
        self._seen_rows = len(rows)
        return list(self._by_booking.get(booking_id, []))

    def outcome_for(self, booking_id: str) -> Published | None:
        outcomes = [m for m in self.published(booking_id) if m.is_outcome]
        return outcomes[-1] if outcomes else None

    def charges_for(self, booking_id: str) -> int:
        return len(self.gateway.keys_by_booking.get(booking_id, set()))

    def dead_lettered(self, message_id: str) -> bool:
        return message_id in self._dead_letters

    def refund(self, booking_id: str, *, amount: int | None, saga_id: str | None = None) -> str:
        message_id = str(uuid.uuid4())
        command = RefundPayment(
            inbound=InboundRef(source=SAGA_SOURCE, message_id=message_id),
            booking_id=booking_id,
            amount=amount,
            saga_id=saga_id,
        )
        refunds = Refunds(self.uow_factory, self.gateway, self.clock, self.policy)

        async def handle() -> None:
            # As the consumer does: record, then settle at once.
            result, payment_id = await refunds.request(command)
            if result is RefundResult.ACCEPTED and payment_id is not None:
                await refunds.settle(SettleRefunds(payment_id=payment_id))

        self._run(handle())
        return message_id

    def refunded_at_gateway(self, booking_id: str) -> int:
        return sum(self.gateway.refunds_by_booking.get(booking_id, {}).values())

    def close(self) -> None:
        self._loop.close()

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coroutine)
