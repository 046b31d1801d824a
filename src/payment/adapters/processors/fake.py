"""The fake processor: success, fail or seeded random charges and refunds, idempotent per key."""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from pathlib import Path
from typing import Literal

import msgspec

from payment.domain.processor import (
    Approved,
    ChargeOutcome,
    ChargeRequest,
    Declined,
    RefundDeclined,
    Refunded,
    RefundOutcome,
    RefundRequest,
)

FakeMode = Literal["success", "fail", "random"]


class LedgerEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One charge the fake decided, as its ledger file keeps it (one JSON line each)."""

    idempotency_key: uuid.UUID
    booking_id: str
    amount: int
    outcome: ChargeOutcome


# Realistic gateway decline codes, drawn from in `fail` and `random` modes.
DECLINE_CODES: tuple[tuple[str, str], ...] = (
    ("card_declined", "The card was declined."),
    ("insufficient_funds", "The card has insufficient funds."),
    ("expired_card", "The card has expired."),
    ("do_not_honor", "The issuer declined the charge."),
    ("lost_card", "The card was reported lost."),
)


class FakeProcessor:
    """A gateway in process.

    In `random` mode a payment's outcome is a function of the seed and its booking id
    only — not of processing order or concurrency — so one seed replays the same outcomes.
    Without a seed, a random seed is drawn once per process.
    """

    name = "fake"

    def __init__(
        self,
        *,
        mode: FakeMode = "success",
        success_rate: float = 0.8,
        seed: int | None = None,
        latency_ms: float = 0.0,
        ledger_path: str | None = None,
    ) -> None:
        if mode not in ("success", "fail", "random"):
            raise ValueError(f"unknown fake mode {mode!r}")
        if not 0.0 <= success_rate <= 1.0:
            raise ValueError("success rate must be between 0 and 1")
        self.mode = mode
        self.success_rate = success_rate
        self.seed = seed if seed is not None else random.SystemRandom().getrandbits(63)
        self.latency_s = latency_ms / 1000.0
        self._ledger: dict[uuid.UUID, ChargeOutcome] = {}
        self._charged: dict[str, int] = {}  # provider reference -> amount charged
        self._refunds: dict[uuid.UUID, tuple[RefundRequest, RefundOutcome]] = {}
        self.calls = 0
        # A ledger that outlives the process (tests audit it as a real gateway's): every
        # charge decided is appended to the file, and a restart reads the file back.
        self._ledger_file = Path(ledger_path) if ledger_path else None
        if self._ledger_file is not None and self._ledger_file.exists():
            for line in self._ledger_file.read_bytes().splitlines():
                entry = msgspec.json.decode(line, type=LedgerEntry)
                self._keep(entry.idempotency_key, entry.amount, entry.outcome)

    @property
    def charges(self) -> dict[uuid.UUID, ChargeOutcome]:
        """Outcomes by idempotency key (one entry per distinct charge)."""
        return dict(self._ledger)

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        self.calls += 1
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        known = self._ledger.get(request.idempotency_key)
        if known is not None:
            return known
        outcome = self._decide(request)
        if self._ledger_file is not None:
            entry = LedgerEntry(
                idempotency_key=request.idempotency_key,
                booking_id=request.booking_id,
                amount=request.money.amount,
                outcome=outcome,
            )
            with self._ledger_file.open("ab") as ledger:
                ledger.write(msgspec.json.encode(entry) + b"\n")
        self._keep(request.idempotency_key, request.money.amount, outcome)
        return outcome

    def _keep(self, key: uuid.UUID, amount: int, outcome: ChargeOutcome) -> None:
        self._ledger[key] = outcome
        if isinstance(outcome, Approved):
            self._charged[outcome.provider_reference] = amount

    async def lookup(self, request: ChargeRequest) -> ChargeOutcome | None:
        return self._ledger.get(request.idempotency_key)

    @property
    def refunds(self) -> dict[uuid.UUID, RefundOutcome]:
        """Refund outcomes by idempotency key (one entry per distinct refund)."""
        return {key: outcome for key, (_, outcome) in self._refunds.items()}

    def refunded(self, charge_reference: str) -> int:
        """The total refunded so far of one charge."""
        return sum(
            r.money.amount
            for r, outcome in self._refunds.values()
            if r.charge_reference == charge_reference and isinstance(outcome, Refunded)
        )

    async def refund(self, request: RefundRequest) -> RefundOutcome:
        self.calls += 1
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        known = self._refunds.get(request.idempotency_key)
        if known is not None:
            return known[1]
        outcome = self._decide_refund(request)
        self._refunds[request.idempotency_key] = (request, outcome)
        return outcome

    async def lookup_refund(self, request: RefundRequest) -> RefundOutcome | None:
        for earlier, outcome in self._refunds.values():
            if earlier.refund_id == request.refund_id:
                return outcome
        return None

    def _decide_refund(self, request: RefundRequest) -> RefundOutcome:
        charged = self._charged.get(request.charge_reference)
        if charged is None:
            return RefundDeclined(code="charge_not_found", message="no such charge", invalid=True)
        if self.refunded(request.charge_reference) + request.money.amount > charged:
            # A real gateway refuses this too: the fake holds the service to it.
            return RefundDeclined(
                code="amount_too_large", message="refund exceeds the charge", invalid=True
            )
        # Like charges: a function of the seed and the booking only, so a seed replays.
        draw = self._draw(f"refund:{request.booking_id}")
        if self.mode == "success" or (self.mode == "random" and draw < self.success_rate):
            return Refunded(provider_reference=f"fake_re_{request.idempotency_key.hex[:21]}")
        return RefundDeclined(code="refund_declined", message="The refund was declined.")

    def _decide(self, request: ChargeRequest) -> ChargeOutcome:
        draw = self._draw(request.booking_id)
        if self.mode == "success" or (self.mode == "random" and draw < self.success_rate):
            return Approved(provider_reference=f"fake_{request.idempotency_key.hex[:24]}")
        code, message = DECLINE_CODES[int(draw * 1_000_003) % len(DECLINE_CODES)]
        return Declined(code=code, message=message)

    def _draw(self, booking_id: str) -> float:
        digest = hashlib.blake2b(f"{self.seed}:{booking_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64
