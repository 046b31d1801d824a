"""The charge exchange with the gateway: charge, look up, confirm that nothing was charged.

One `ChargeGateway` holds what every exchange needs (the processor, the execution policy
and the clock); the handlers decide what to record of its answers.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import NamedTuple

import msgspec

from payment.application import failpoints
from payment.application.ports import Clock
from payment.application.retry import full_jitter
from payment.domain.payment import Payment
from payment.domain.processor import (
    ChargeOutcome,
    ChargeRequest,
    OutcomeUnknown,
    PaymentProcessor,
    ProcessorUnavailable,
)

# What one exchange ends with: the gateway's outcome, or why it gave none.
Final = ChargeOutcome | ProcessorUnavailable | OutcomeUnknown
# Each call of an exchange ("charge" or "lookup") and what it gave, in order.
AttemptLog = list[tuple[str, Final]]


class Exchange(NamedTuple):
    """One exchange with the gateway: its calls, how it ended, and the ChargeStarted it
    ran under (None: a lookup that charged nothing)."""

    attempts: AttemptLog
    final: Final
    charger: uuid.UUID | None = None


class ExecutionPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How hard to try the gateway before giving up on a payment for now."""

    # None: the processor bounds its own calls (the LimitedProcessor, whose timeout does
    # not count the wait for a slot under the gateway's limits).
    call_timeout_s: float | None = 10.0
    max_attempts: int = 4
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 5.0
    review_after_s: float = 3600.0
    # How long the gateway honours an idempotency key (None: for good). A payment older
    # than this is looked up before it is charged: under an expired key a charge is a
    # new charge, whatever an earlier attempt whose answer was lost did.
    key_lifetime_s: float | None = None
    # How long a ChargeStarted keeps other callers from charging the payment: longer than
    # one `ChargeGateway.charge` (its attempts, backoffs and the lookup), so that a live
    # charger is never overtaken; a dead one's payment is charged again once it has passed.
    charge_lease_s: float = 60.0
    # How far the gateway's lookup lags behind its charges (Stripe's search: about a
    # minute). A miss on a younger payment proves nothing: it counts as unknown.
    lookup_settle_s: float = 0.0

    def backoff_s(self, attempt: int) -> float:
        """The wait after failed call number `attempt`, with full jitter: spreads the
        retries of many payments hitting one outage."""
        return full_jitter(
            attempt, initial=self.backoff_initial_s, maximum=self.backoff_max_s, rng=random.random
        )


def charge_request(payment: Payment) -> ChargeRequest:
    """What the gateway is asked to charge (or look up) for `payment`, under its one key."""
    return ChargeRequest(
        payment_id=payment.id,
        booking_id=payment.booking_id,
        money=payment.money,
        payment_method=payment.payment_method,
        idempotency_key=payment.idempotency_key,
        customer_id=payment.customer_id,
    )


class ChargeGateway:
    """Charges and lookups of payments at one processor, under one policy and clock."""

    def __init__(self, processor: PaymentProcessor, policy: ExecutionPolicy, clock: Clock) -> None:
        self.processor = processor
        self.policy = policy
        self.clock = clock

    @property
    def name(self) -> str:
        """The processor's name, as the events record it."""
        return self.processor.name

    def age(self, payment: Payment) -> float:
        """Seconds since the payment was initiated."""
        return (self.clock.now() - payment.initiated_at).total_seconds()

    async def charge(self, payment: Payment, charger: uuid.UUID) -> Exchange:
        """Call the gateway until it answers (or the policy gives up): the calls and the last.

        A payment initiated longer ago than the gateway keeps idempotency keys is looked
        up first (`_look_up_before_late_charge`). `charger`: the caller's ChargeStarted.
        """
        request = charge_request(payment)
        age = self.age(payment)
        lifetime = self.policy.key_lifetime_s
        if lifetime is not None and age >= lifetime:
            settled = await self._look_up_before_late_charge(request, age)
            if settled is not None:
                return Exchange(*settled, charger)
        attempts: AttemptLog = []
        outcome = await self._charge_until_answered(request, attempts)
        if isinstance(outcome, ProcessorUnavailable) and not payment.only_charger(charger):
            outcome = await self._confirm_no_charge(request, attempts, outcome, age)
        return Exchange(attempts, outcome, charger)

    async def look_up(self, payment: Payment) -> ChargeOutcome | OutcomeUnknown | None:
        """What the gateway holds for `payment` (see `_look_up`)."""
        return await self._look_up(charge_request(payment), self.age(payment))

    async def _charge_until_answered(self, request: ChargeRequest, attempts: AttemptLog) -> Final:
        policy = self.policy
        outcome: Final
        for attempt in range(1, policy.max_attempts + 1):
            failpoints.hit("before_charge")
            try:
                # asyncio.timeout, not wait_for: no extra task per gateway call.
                async with asyncio.timeout(policy.call_timeout_s):
                    outcome = await self.processor.charge(request)
            except TimeoutError:
                # The request may have reached the gateway: never treat it as a failure.
                outcome = OutcomeUnknown("no answer within the call timeout")
            except (ProcessorUnavailable, OutcomeUnknown) as exc:
                outcome = exc
            failpoints.hit("after_charge")
            attempts.append(("charge", outcome))
            if not isinstance(outcome, ProcessorUnavailable) or attempt == policy.max_attempts:
                break
            await asyncio.sleep(policy.backoff_s(attempt))
        return outcome

    async def _look_up_before_late_charge(
        self, request: ChargeRequest, age_s: float
    ) -> tuple[AttemptLog, ChargeOutcome | OutcomeUnknown] | None:
        """The gateway may have forgotten this payment's idempotency key, so a charge now
        would not find an earlier one (made before a crash, its answer lost): ask first.

        Returns the charge the gateway holds, or OutcomeUnknown (nothing charged, the
        payment stays in flight) if it cannot say; None when it holds no charge: charging
        is safe.
        """
        found = await self._look_up(request, age_s)
        if isinstance(found, OutcomeUnknown):
            return [], OutcomeUnknown(
                f"the idempotency key may have expired and {found}: not charged"
            )
        if found is not None:
            return [("lookup", found)], found
        return None

    async def _confirm_no_charge(
        self,
        request: ChargeRequest,
        attempts: AttemptLog,
        unavailable: ProcessorUnavailable,
        age_s: float,
    ) -> Final:
        """Before failing as unavailable, ask the gateway whether it holds a charge anyway.

        Our own refused calls charged nothing, but an earlier call whose answer was never
        recorded (a crash after the charge in a version without ChargeStarted, say) may
        have: only the gateway's "no such charge" makes `processor_unavailable` safe. If it
        cannot be asked either, or its answer may lag (`lookup_settle_s`), the payment
        stays in flight for the reconciler. (Where the stream proves the caller the only
        charger, `charge` does not ask: see `Payment.only_charger`.)
        """
        found = await self._look_up(request, age_s)
        if isinstance(found, OutcomeUnknown):
            return found
        if found is not None:
            attempts.append(("lookup", found))
            return found
        return unavailable

    async def _look_up(
        self, request: ChargeRequest, age_s: float
    ) -> ChargeOutcome | OutcomeUnknown | None:
        """What the gateway holds for this payment (`age_s` old): its charge, None for "no
        charge", or OutcomeUnknown when it cannot say now (unreachable, no answer in time,
        a charge still in progress, or a miss younger than the lookup's lag): then an
        earlier charge cannot be ruled out."""
        try:
            async with asyncio.timeout(self.policy.call_timeout_s):
                found = await self.processor.lookup(request)
        except (ProcessorUnavailable, OutcomeUnknown, TimeoutError) as exc:
            return OutcomeUnknown(
                "the gateway cannot rule out an unrecorded earlier charge now"
                f" ({type(exc).__name__})"
            )
        settle_s = self.policy.lookup_settle_s
        if found is None and age_s < settle_s:
            return OutcomeUnknown(
                f"no charge found, but the gateway's lookup may lag {settle_s:g}s"
            )
        return found
