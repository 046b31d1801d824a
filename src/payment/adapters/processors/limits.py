"""The gateway's limits in front of any processor: bulkhead, adaptive rate, call timeout.

`LimitedProcessor` wraps a `PaymentProcessor`; every caller of the gateway (the executor,
the reconciler, lookups and charges alike) goes through the one instance, so together
they never have more than `max_concurrency` calls in flight nor send more than the
current rate per second. Waiting for a slot is not part of the call: the call timeout
starts when the request is sent. See docs/adr/0005-gateway-limits.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import msgspec

from payment.domain.processor import (
    ChargeOutcome,
    ChargeRequest,
    PaymentProcessor,
    ProcessorRateLimited,
    RefundOutcome,
    RefundRequest,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_Req = TypeVar("_Req", ChargeRequest, RefundRequest)

Sleep = Callable[[float], Awaitable[None]]
Monotonic = Callable[[], float]

# A 429 without Retry-After pauses every call this long.
DEFAULT_PAUSE_S: Final = 1.0


class GatewayLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Calls in flight and calls per second, per instance (PAYMENT_PROCESSOR_MAX_*)."""

    max_concurrency: int
    max_rate: float


# Defaults per processor kind (README, "Configuration"): Stripe allows 25 operations a
# second in test mode and 100 in live mode; the in-process fake has no limit of its own.
DEFAULT_LIMITS: Final = {
    "fake": GatewayLimits(max_concurrency=1024, max_rate=10_000.0),
    "sandbox": GatewayLimits(max_concurrency=16, max_rate=20.0),
    "stripe": GatewayLimits(max_concurrency=64, max_rate=80.0),
}


def limits_for(
    processor: str, max_concurrency: int | None, max_rate: float | None
) -> GatewayLimits:
    """The configured limits, each defaulting to the processor kind's."""
    default = DEFAULT_LIMITS[processor]
    return GatewayLimits(
        max_concurrency=max_concurrency or default.max_concurrency,
        max_rate=max_rate or default.max_rate,
    )


# From this rate on (calls under a millisecond apart) a call may go up to BURST_S ahead of
# its turn: a timer per call there costs the service more than the spacing is worth (the
# fake gateway's 10,000/s paced a batch of charges over milliseconds of timers, and the
# batch's outcomes over several transactions: about 7 % of the service's CPU at capacity,
# docs/performance.md). Real gateways' limits (tens of calls a second) are spaced.
BURST_FROM_RATE: Final = 1_000.0
BURST_S: Final = 0.025


class AdaptiveRate:
    """At most `rate` calls in any second, the rate adapting to the gateway (AIMD).

    Below `BURST_FROM_RATE` calls are spaced `1 / rate` apart. From it on a call may go up
    to `BURST_S` (τ) ahead of its turn, and the turns are `(1 + τ) / rate` apart (the
    generic cell rate algorithm): `rate` turns span `1 + τ` seconds and no call goes more
    than τ early, so a second still holds at most `rate` calls, as with plain spacing.
    A throttle (the gateway's 429) halves the rate, never below `min_rate`, and pauses
    every call until its `Retry-After` has passed; afterwards the rate grows back by
    `max_rate / recovery_s` each second until it is `max_rate` again. Throttles within
    `1 / rate` of the last decrease count once: they answer calls sent before it.
    Pure arithmetic over the injected clock, so tests need no real time.
    """

    def __init__(
        self,
        max_rate: float,
        *,
        clock: Monotonic = time.monotonic,
        min_rate: float | None = None,
        recovery_s: float = 10.0,
    ) -> None:
        if max_rate <= 0:
            raise ValueError("max_rate must be positive")
        self.max_rate = max_rate
        self.min_rate = min_rate if min_rate is not None else max(max_rate / 50, 0.2)
        self._recovery_per_s = max_rate / recovery_s
        self._clock = clock
        self._floor = max_rate  # the rate right after the last decrease
        self._decreased_at: float | None = None
        self._next_at = float("-inf")
        self._paused_until = float("-inf")

    def rate(self) -> float:
        """The rate now, in calls per second."""
        if self._decreased_at is None:
            return self.max_rate
        grown = self._floor + self._recovery_per_s * (self._clock() - self._decreased_at)
        return min(self.max_rate, grown)

    def reserve(self) -> float:
        """Take the next send time: how long the caller must wait before sending (s)."""
        now = self._clock()
        rate = self.rate()
        ahead = BURST_S if rate >= BURST_FROM_RATE else 0.0
        at = max(now, self._next_at - ahead, self._paused_until)
        # The next turn is one after this call's own turn (its send time, unless it went ahead).
        self._next_at = max(self._next_at, at) + (1.0 + ahead) / rate
        return at - now

    def paused_for(self) -> float:
        """How long every call must still wait for a throttle's pause to end (s)."""
        return max(0.0, self._paused_until - self._clock())

    def throttled(self, retry_after_s: float | None) -> None:
        """The gateway refused a call for its rate limit: slow down, pause."""
        now = self._clock()
        self._paused_until = max(self._paused_until, now + (retry_after_s or DEFAULT_PAUSE_S))
        current = self.rate()
        if self._decreased_at is not None and now - self._decreased_at < 1.0 / current:
            return
        self._floor = max(self.min_rate, current / 2)
        self._decreased_at = now


async def _real_sleep(delay: float) -> None:
    await asyncio.sleep(delay)


class LimitedProcessor:
    """A PaymentProcessor whose calls share one bulkhead and one adaptive rate.

    A call waits for a slot (at most `max_concurrency` in flight), then for its turn
    under the rate, and only then starts its `call_timeout_s` (raising `TimeoutError`
    when it expires, as the handlers expect). A call the gateway refused for its rate
    limit charged nothing: it is sent again, after the pause, up to `throttle_retries`
    times before `ProcessorRateLimited` reaches the caller.
    """

    def __init__(
        self,
        inner: PaymentProcessor,
        limits: GatewayLimits,
        *,
        call_timeout_s: float | None,
        throttle_retries: int = 8,
        clock: Monotonic = time.monotonic,
        sleep: Sleep = _real_sleep,
    ) -> None:
        if limits.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.inner = inner
        self.name = inner.name
        self.limits = limits
        self.rate = AdaptiveRate(limits.max_rate, clock=clock)
        self._slots = asyncio.Semaphore(limits.max_concurrency)
        self._timeout_s = call_timeout_s
        self._throttle_retries = throttle_retries
        self._sleep = sleep
        self.in_flight = 0
        self.most_in_flight = 0
        self.waiting = 0
        self.throttles = 0

    async def charge(self, request: ChargeRequest) -> ChargeOutcome:
        return await self._call(self.inner.charge, request)

    async def lookup(self, request: ChargeRequest) -> ChargeOutcome | None:
        return await self._call(self.inner.lookup, request)

    # Refunds share the charges' bulkhead and rate: the gateway counts them alike.
    async def refund(self, request: RefundRequest) -> RefundOutcome:
        return await self._call(self.inner.refund, request)

    async def lookup_refund(self, request: RefundRequest) -> RefundOutcome | None:
        return await self._call(self.inner.lookup_refund, request)

    async def _call(self, call: Callable[[_Req], Awaitable[_T]], request: _Req) -> _T:
        for retry in range(self._throttle_retries + 1):
            try:
                return await self._once(call, request)
            except ProcessorRateLimited as exc:
                self.throttles += 1
                self.rate.throttled(exc.retry_after_s)
                if retry == self._throttle_retries:
                    raise
                log.info(
                    "processor %s rate-limited us: slowing to %.1f calls/s",
                    self.name,
                    self.rate.rate(),
                )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(self, call: Callable[[_Req], Awaitable[_T]], request: _Req) -> _T:
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            delay = self.rate.reserve()
            if delay > 0:
                await self._sleep(delay)
            # A throttle seen while this call waited pauses it too: take a new turn after.
            while (paused := self.rate.paused_for()) > 0:
                await self._sleep(paused)
                delay = self.rate.reserve()
                if delay > 0:
                    await self._sleep(delay)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                async with asyncio.timeout(self._timeout_s):
                    return await call(request)
            finally:
                self.in_flight -= 1
        finally:
            self._slots.release()


__all__ = [
    "BURST_FROM_RATE",
    "BURST_S",
    "DEFAULT_LIMITS",
    "AdaptiveRate",
    "GatewayLimits",
    "LimitedProcessor",
    "limits_for",
]
