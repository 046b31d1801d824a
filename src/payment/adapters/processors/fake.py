"""The fake processor: success, fail or seeded random outcomes, idempotent per key, in process."""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from typing import Literal

from payment.domain.processor import Approved, ChargeOutcome, ChargeRequest, Declined

FakeMode = Literal["success", "fail", "random"]

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
        self.calls = 0

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
        self._ledger[request.idempotency_key] = outcome
        return outcome

    async def lookup(self, request: ChargeRequest) -> ChargeOutcome | None:
        return self._ledger.get(request.idempotency_key)

    def _decide(self, request: ChargeRequest) -> ChargeOutcome:
        draw = self._draw(request.booking_id)
        if self.mode == "success" or (self.mode == "random" and draw < self.success_rate):
            return Approved(provider_reference=f"fake_{request.idempotency_key.hex[:24]}")
        code, message = DECLINE_CODES[int(draw * 1_000_003) % len(DECLINE_CODES)]
        return Declined(code=code, message=message)

    def _draw(self, booking_id: str) -> float:
        digest = hashlib.blake2b(f"{self.seed}:{booking_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64
