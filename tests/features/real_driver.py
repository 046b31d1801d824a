"""The Gherkin scenarios through the real stack: PostgreSQL, the broker, `payment-service run`.

`RealStackDriver` implements `PaymentsDriver` from the outside, as the booking saga sees
the service: each `start()` gives a fresh database and fresh topics, and the real
`payment-service run` process is launched (by the e2e harness) with the processor chosen
by configuration alone — `PAYMENT_PROCESSOR=fake` with `PAYMENT_FAKE_*`, or
`PAYMENT_PROCESSOR=sandbox` with a test key and `PAYMENT_STRIPE_API_BASE` pointing at
localstripe through a TCP proxy. Requests go over Kafka as CloudEvents; what the service
publishes is collected by the harness's `Orchestrator`.

How each driver method is realised, and where the two processors differ:

- Waiting (`deliver_initiated`): an *invalid* request on every partition of the request
  topic acts as a sentinel (the service answers it without a payment or a gateway call;
  partitions are consumed in order, so once its answer is out every earlier request was
  handled, redeliveries included); then the database until every payment is terminal or
  has an unknown outcome recorded and every outbox row is published; then the
  orchestrator until it has received every outbox event. No sleeps, no guessed delays.
- "Approves / declines every charge": the fake is configured (`PAYMENT_FAKE_MODE`). The
  sandbox has no such switch, Stripe's test mode decides by the card: the driver stands
  in for the customer and turns the saga's usual token (`tok_visa`) into the test card
  the scenario calls for (`pm_card_visa` approves, `pm_card_chargeCustomerFail` is
  declined). Random outcomes exist only on the fake; the sandbox skips those scenarios.
- A lost answer: on the sandbox the proxy forwards the next charge (`POST`) to localstripe
  and drops its response. The fake gateway lives inside the service process, so its
  answer cannot be lost short of killing the process (which turns the scenario into crash
  recovery): the fake skips that scenario.
- Charges: on the sandbox, localstripe's own ledger (PaymentIntents whose metadata names
  the booking). The fake keeps its ledger in a file of the scenario
  (`PAYMENT_FAKE_LEDGER_PATH`) that outlives the service process: the driver counts the
  distinct idempotency keys charged for the booking there, as a gateway would see them,
  and checks the service's own audit trail (the attempts it recorded as having reached
  the gateway) says the same.
- Reconciling: when a scenario loses an answer, the service is launched with
  `PAYMENT_RECONCILE_AFTER_S` of a few seconds; `reconcile()` waits for the running
  service's reconciler to resolve every payment in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Literal, TypeVar, Unpack

import psycopg
import pytest

from e2e.harness import (
    Orchestrator,
    Received,
    Sent,
    ServiceStack,
    booking_on_partition,
    open_stack,
)
from support.localstripe import API_KEY, LocalStripe
from support.proxy import TcpProxy

from .driver import TERMINAL_TYPES, ProcessorSetup, Published, RequestFields

T = TypeVar("T")

RealProcessor = Literal["fake", "sandbox"]

# The saga's usual payment token in the scenarios, and what it becomes at the sandbox.
SAGA_TOKEN = "tok_visa"
SANDBOX_CARDS = {"success": "pm_card_visa", "fail": "pm_card_chargeCustomerFail"}

# Once an answer was lost, the reconciler looks at payments in flight this long. Long
# enough that "not told an outcome yet" is checked well before it acts (that check runs
# milliseconds after the lost answer is recorded, seconds on a loaded machine), short
# enough to keep scenarios quick.
RECONCILE_AFTER_S = 6.0
RECONCILE_INTERVAL_S = 0.2

# How long the service may take to act on what it was sent (1000 payments on a loaded
# two-core machine take about half a minute).
SETTLE_TIMEOUT_S = 240.0

SKIP_RANDOM_ON_SANDBOX = (
    "cannot exist: the sandbox gateway has no random mode: Stripe's test mode approves or "
    "declines by the test card, so there is no seed or success rate to configure"
)
SKIP_LOST_ANSWER_ON_FAKE = (
    "cannot exist: the fake gateway runs inside the service process, so its answer cannot "
    "be lost short of killing the process (that is crash recovery, not reconciliation); "
    "the sandbox run covers this scenario with a proxy that drops the gateway's answer"
)

# A payment is settled once it is terminal, or in flight with an unknown outcome recorded.
_UNSETTLED_PAYMENTS = """
SELECT count(*) FROM payment_payments p
WHERE p.status = 'INITIATED'
  AND NOT EXISTS (
      SELECT FROM payment_events e
      WHERE e.stream_id = p.payment_id AND e.event_type = 'ChargeAttempted'
        AND e.data->>'result' = 'unknown'
  )
"""
_IN_FLIGHT = "SELECT count(*) FROM payment_payments WHERE status = 'INITIATED'"
_UNPUBLISHED = "SELECT count(*) FROM payment_outbox WHERE published_at IS NULL"
_OUTBOX_EVENTS = "SELECT event_id::text, count(*) FROM payment_outbox GROUP BY event_id"
# The service's audit trail of charges: idempotency keys of the booking's payments with an
# attempt that reached the gateway (anything but "unavailable"); checked against the fake's.
_RECORDED_CHARGES = """
SELECT count(DISTINCT i.data->>'idempotency_key') FROM payment_events i
WHERE i.event_type = 'PaymentInitiated' AND i.data->>'booking_id' = %s
  AND EXISTS (
      SELECT FROM payment_events a
      WHERE a.stream_id = i.stream_id AND a.event_type = 'ChargeAttempted'
        AND a.data->>'result' <> 'unavailable'
  )
"""
# The fake's refunds, from the stream: the amounts of the booking's PaymentRefunded events.
_RECORDED_REFUNDS = """
SELECT coalesce(sum((r.data->>'amount')::bigint), 0) FROM payment_events r
JOIN payment_events i ON i.stream_id = r.stream_id AND i.event_type = 'PaymentInitiated'
WHERE r.event_type = 'PaymentRefunded' AND i.data->>'booking_id' = %s
"""


class _LoopThread:
    """An event loop in a thread of its own: the orchestrator keeps listening between steps."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="realstack-driver", daemon=True
        )
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()


class RealStackDriver:
    """`PaymentsDriver` over PostgreSQL, the broker and the real `payment-service run`.

    `processor` picks the gateway by configuration alone: `fake`, or `sandbox` (Stripe's
    test mode, here localstripe behind a TCP proxy). The service is launched lazily, on
    the first request after `start()`, so that everything the Given steps set up (the
    processor, an answer to lose) is in its environment.
    """

    def __init__(
        self,
        processor: RealProcessor,
        *,
        bootstrap: str,
        make_database: Callable[..., str],
        log_dir: Path,
        localstripe: LocalStripe | None = None,
    ) -> None:
        if processor == "sandbox" and localstripe is None:
            raise ValueError("the sandbox driver needs a localstripe")
        self.processor = processor
        self._bootstrap = bootstrap
        self._make_database = make_database
        self._log_dir = log_dir
        self._localstripe = localstripe
        self._loop = _LoopThread()
        self._proxy: TcpProxy | None = None
        if localstripe is not None:
            self._proxy = self._run(TcpProxy("127.0.0.1", localstripe.port).start())
        self._exits: AsyncExitStack | None = None
        self._stack: ServiceStack | None = None
        self._db: psycopg.AsyncConnection[Any] | None = None
        self._setup = ProcessorSetup()
        self._lose_answers = 0
        self._sent: dict[str, Sent] = {}
        self._known_intents: set[str] = set()
        self._fake_ledger = log_dir / "fake-ledger-unused.jsonl"
        self._watchers: set[asyncio.Task[None]] = set()

    # -- the service -----------------------------------------------------------------

    def start(self, processor: ProcessorSetup) -> None:
        if self.processor == "sandbox" and processor.mode == "random":
            pytest.skip(SKIP_RANDOM_ON_SANDBOX)
        self._stop_service()
        self._setup = processor
        self._lose_answers = 0
        self._sent = {}
        # The log directory is shared by the scenarios: each start has a ledger of its own.
        self._fake_ledger = self._log_dir / f"fake-ledger-{uuid.uuid4().hex[:12]}.jsonl"

    def _environment(self) -> dict[str, str]:
        """PAYMENT_* overrides of this start: the processor swap is configuration alone."""
        setup = self._setup
        if self.processor == "fake":
            env = {
                "PAYMENT_PROCESSOR": "fake",
                "PAYMENT_FAKE_MODE": setup.mode,
                "PAYMENT_FAKE_SUCCESS_RATE": str(setup.success_rate),
                "PAYMENT_FAKE_SEED": "" if setup.seed is None else str(setup.seed),
                "PAYMENT_FAKE_LEDGER_PATH": str(self._fake_ledger),
            }
        else:
            assert self._proxy is not None
            env = {
                "PAYMENT_PROCESSOR": "sandbox",
                "PAYMENT_STRIPE_API_KEY": API_KEY,
                "PAYMENT_STRIPE_API_BASE": self._proxy.url,
                "PAYMENT_FAKE_MODE": "",
            }
        if self._lose_answers:
            env["PAYMENT_RECONCILE_AFTER_S"] = str(RECONCILE_AFTER_S)
            env["PAYMENT_RECONCILE_INTERVAL_S"] = str(RECONCILE_INTERVAL_S)
        return env

    def _ensure_running(self) -> ServiceStack:
        if self._stack is not None:
            return self._stack
        if self._localstripe is not None:
            # Charges are told apart from earlier scenarios' by the intents already there.
            self._known_intents = {i["id"] for i in self._localstripe.payment_intents()}
        database_url = self._make_database(prefix="payment_bdd")

        async def launch() -> None:
            exits = AsyncExitStack()
            try:
                self._stack = await exits.enter_async_context(
                    open_stack(
                        bootstrap=self._bootstrap,
                        database_url=database_url,
                        log_dir=self._log_dir,
                        topic_prefix=f"bdd-{self.processor}",
                        **self._environment(),
                    )
                )
                self._db = await exits.enter_async_context(
                    await psycopg.AsyncConnection.connect(database_url, autocommit=True)
                )
            except BaseException:
                await exits.aclose()
                raise
            self._exits = exits

        self._run(launch())
        assert self._stack is not None
        return self._stack

    def _stop_service(self) -> None:
        exits, self._exits = self._exits, None
        self._stack = None
        self._db = None
        if exits is not None:
            self._run(exits.aclose())

    @property
    def _orch(self) -> Orchestrator:
        return self._ensure_running().orch

    # -- the saga's side ---------------------------------------------------------------

    def request(self, booking_id: str, **fields: Unpack[RequestFields]) -> str:
        orch = self._orch
        method = self._gateway_method(fields["payment_method"])
        sent = self._run(orch.request(booking_id, **{**fields, "payment_method": method}))
        assert sent.ce_id is not None
        self._sent[sent.ce_id] = sent
        return sent.ce_id

    def _gateway_method(self, payment_method: str) -> str:
        # Stripe's test mode decides by the card: the scenario's processor behaviour
        # becomes the test card the customer pays with (see the module docstring).
        if self.processor == "sandbox" and payment_method == SAGA_TOKEN:
            return SANDBOX_CARDS[self._setup.mode]
        return payment_method

    def redeliver(self, message_id: str) -> None:
        orch = self._orch
        self._run(orch.redeliver(self._sent[message_id]))

    def deliver_initiated(self) -> None:
        # The service's own consumers deliver payment.initiated: wait until it has acted.
        self._run(self._settle(), timeout_s=SETTLE_TIMEOUT_S)

    def lose_next_response(self) -> None:
        if self.processor == "fake":
            pytest.skip(SKIP_LOST_ANSWER_ON_FAKE)
        assert self._proxy is not None
        if self._stack is not None:
            raise RuntimeError("lose the answer before the first request: the service is up")
        self._lose_answers += 1
        self._run(self._arm_lost_answer())

    async def _arm_lost_answer(self) -> None:
        proxy = self._proxy
        assert proxy is not None
        dropped = proxy.dropped_responses
        proxy.target = b"POST "  # the charge; lookups (GET) still get their answers
        proxy.mode = "drop_response"

        async def forward_after_one() -> None:
            # The proxy keeps counters, not events: a millisecond poll flips it back long
            # before the reconciler's next charge (seconds away).
            while proxy.dropped_responses == dropped:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            proxy.mode = "forward"

        task = asyncio.get_running_loop().create_task(forward_after_one())
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    def reconcile(self) -> None:
        async def resolved() -> None:
            await self._poll(_IN_FLIGHT, "every payment in flight to be reconciled")
            await self._settle_published()

        self._run(resolved(), timeout_s=RECONCILE_AFTER_S * 10 + 60)

    # -- what the saga was told ------------------------------------------------------

    def published(self, booking_id: str) -> list[Published]:
        orch = self._orch

        async def read() -> list[Published]:
            found = orch.events.for_booking(booking_id)
            return [_published(r) for r in found if r.kind != "dead_letter"]

        return self._run(read())

    def outcome_for(self, booking_id: str) -> Published | None:
        outcomes = [m for m in self.published(booking_id) if m.type in TERMINAL_TYPES]
        return outcomes[-1] if outcomes else None

    def charges_for(self, booking_id: str) -> int:
        if self._localstripe is not None:
            return sum(
                intent["metadata"].get("booking_id") == booking_id
                for intent in self._localstripe.payment_intents()
                if intent["id"] not in self._known_intents
            )
        self._ensure_running()

        async def recorded() -> int:
            assert self._db is not None
            cursor = await self._db.execute(_RECORDED_CHARGES, (booking_id,))
            row = await cursor.fetchone()
            return int(row[0]) if row else 0

        charged = self._fake_charges(booking_id)
        audited = self._run(recorded())
        assert charged == audited, (
            f"{booking_id}: the fake's ledger holds {charged} charges, the service's audit"
            f" trail {audited}"
        )
        return charged

    def _fake_charges(self, booking_id: str) -> int:
        """Distinct idempotency keys charged for the booking, from the fake's ledger file."""
        if not self._fake_ledger.exists():
            return 0
        entries = [json.loads(line) for line in self._fake_ledger.read_text().splitlines()]
        return len({e["idempotency_key"] for e in entries if e["booking_id"] == booking_id})

    def dead_lettered(self, message_id: str) -> bool:
        orch = self._orch
        sent = self._sent[message_id]

        async def found() -> bool:
            # The sentinels already proved the request handled; the dead-letter topic is
            # read alongside the others, so a short wait only covers the collector's lag.
            with contextlib.suppress(AssertionError):
                await orch.wait_dead_letter(sent, timeout_s=10.0)
                return True
            return False

        return self._run(found())

    def refund(self, booking_id: str, *, amount: int | None, saga_id: str | None = None) -> str:
        orch = self._orch
        before = len(orch.refund_outcomes(booking_id))
        fields = {} if saga_id is None else {"saga_id": saga_id}
        sent = self._run(orch.refund(booking_id, amount=amount, **fields))
        self._run(orch.wait_refund_outcomes(booking_id, before + 1, timeout_s=SETTLE_TIMEOUT_S))
        assert sent.ce_id is not None
        self._sent[sent.ce_id] = sent
        return sent.ce_id

    def refunded_at_gateway(self, booking_id: str) -> int:
        if self._localstripe is not None:
            return sum(
                int(refund["amount"])
                for refund in self._localstripe.refunds()
                if refund.get("metadata", {}).get("booking_id") == booking_id
                and refund.get("status") == "succeeded"
            )
        self._ensure_running()

        async def recorded() -> int:
            assert self._db is not None
            cursor = await self._db.execute(_RECORDED_REFUNDS, (booking_id,))
            row = await cursor.fetchone()
            return int(row[0]) if row else 0

        return self._run(recorded())

    def close(self) -> None:
        async def stop_gateway() -> None:
            for task in list(self._watchers):  # an answer armed but never lost
                task.cancel()
            if self._proxy is not None:
                await self._proxy.stop()

        try:
            self._stop_service()
            self._run(stop_gateway())
        finally:
            self._loop.close()

    # -- waiting for the service -----------------------------------------------------

    async def _settle(self) -> None:
        orch = self._orch
        partitions = orch.partitions[orch.topics.request]
        sentinels = [booking_on_partition("settle", p, partitions) for p in range(partitions)]
        for booking in sentinels:
            # Invalid (amount 0): answered without a payment, a gateway call or a charge.
            await orch.request(booking, amount=0, payment_method="pm_card_visa")
        for booking in sentinels:
            told = await orch.wait_outcome(booking, timeout_s=SETTLE_TIMEOUT_S)
            assert told.reason == "invalid_request", told.describe()
        await self._poll(_UNSETTLED_PAYMENTS, "every payment to be executed")
        await self._settle_published()

    async def _settle_published(self) -> None:
        orch = self._orch
        await self._poll(_UNPUBLISHED, "the outbox to be published")
        assert self._db is not None
        cursor = await self._db.execute(_OUTBOX_EVENTS)
        expected = Counter({str(event_id): int(n) for event_id, n in await cursor.fetchall()})

        def all_received(log: Any) -> bool:
            received = Counter(r.ce_id for r in log.records if r.kind != "dead_letter")
            return all(received[event_id] >= n for event_id, n in expected.items())

        await orch.wait_for(
            all_received, timeout_s=SETTLE_TIMEOUT_S, what="every outbox event to be received"
        )

    async def _poll(self, count_query: str, what: str) -> None:
        """Until `count_query` counts zero rows; progress is logged on timeout."""
        assert self._db is not None and self._stack is not None
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            cursor = await self._db.execute(count_query)
            row = await cursor.fetchone()
            left = int(row[0]) if row else 0
            if left == 0:
                return
            if not self._stack.service.running or time.monotonic() > deadline:
                raise AssertionError(
                    f"waiting for {what}: {left} left\n{self._stack.diagnostics()}"
                )
            await asyncio.sleep(0.05)

    def _run(self, coroutine: Awaitable[T], timeout_s: float | None = None) -> T:
        async def bounded() -> T:
            if timeout_s is None:
                return await coroutine
            async with asyncio.timeout(timeout_s):
                return await coroutine

        return self._loop.run(bounded())


def _published(record: Received) -> Published:
    return Published(
        type=record.header("ce_type") or f"payment.{record.kind}",
        event_id=record.ce_id or "",
        key=record.key_text or "",
        data=dict(record.data) if isinstance(record.data, dict) else {},
    )
