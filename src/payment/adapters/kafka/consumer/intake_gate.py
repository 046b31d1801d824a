"""Backpressure from the outbox to request intake: a gate that closes while the outbox
backlog is high and opens again once it is low, fed by a database probe.

Under overload the consumer would otherwise admit requests as long as slots are free:
handlers fill the event loop, the outbox relay (a coroutine in the same loop) is starved,
rows wait seconds to be published and new requests keep adding rows. While the gate is
closed the consumer admits no new request (they wait on the broker, their partitions
paused); payment.initiated and refunds keep flowing, since executing drains the work.

The backlog is read from the database, not from the relay: the relay may lead in another
instance of the group, and every instance must see the same backlog.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

from payment.adapters.observability.metrics import Metrics

log = logging.getLogger(__name__)

PROBE_INTERVAL_S: Final = 0.2
# A probe that does not answer within this counts as failed (the gate keeps its state).
PROBE_TIMEOUT_S: Final = 2.0
# Under sustained overload the gate closes and opens again every few seconds. A pause
# that comes this long after the last resume starts an overload episode: a warning, and
# an info line at its first resume; the flaps that follow within it are debug lines
# (payment_consumer_intake_pauses_total counts every pause).
EPISODE_QUIET_S: Final = 60.0

# Counts unpublished outbox rows, up to `limit` (a bounded count stays cheap however
# large the backlog); raises when the database cannot be asked.
BacklogProbe = Callable[[int], Awaitable[int]]


class IntakeGate(Protocol):
    """Whether the inbox consumer may admit new requests now."""

    @property
    def admits_requests(self) -> bool:
        """False while new requests must wait; executions and refunds never do."""
        ...


class AlwaysOpen:
    """No backpressure: requests are admitted by free slots alone (tests, in-memory wiring)."""

    @property
    def admits_requests(self) -> bool:
        return True


ALWAYS_OPEN: Final = AlwaysOpen()


def backlog_marks(relay_batch_size: int) -> tuple[int, int]:
    """The high- and low-water marks of the outbox backlog, from PAYMENT_RELAY_BATCH_SIZE.

    Derived, not configured (the contract lists the configuration; the gate has no setting
    of its own): four relay passes' worth of unpublished rows close the gate, fewer than
    two reopen it. The gap between them keeps the gate from flapping at every probe.
    """
    return 4 * relay_batch_size, 2 * relay_batch_size


class OutboxBacklogGate:
    """Open, or closed for new requests while the outbox backlog is high (hysteresis).

    Closes when a count exceeds `high`, opens again when one falls below `low`. `run()`
    probes the database every `interval_s`; a failed probe keeps the last state (a
    database outage holds up the handlers anyway) and is logged once per outage.
    """

    def __init__(
        self,
        probe: BacklogProbe,
        *,
        high: int,
        low: int,
        metrics: Metrics,
        interval_s: float = PROBE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= low <= high:
            raise ValueError(f"need 0 <= low <= high, got low={low}, high={high}")
        self.high, self.low = high, low
        self._probe = probe
        self._pauses = metrics.intake_pauses
        self._interval_s = interval_s
        # Open until a reading says otherwise; failing while probes fail (one warning).
        self._open, self._failing = True, False
        # The last count read (at most high + 1), None before the first.
        self.backlog: int | None = None
        self._clock = clock
        self._last_resume: float | None = None
        self._episode_announced = False

    @classmethod
    def for_relay(
        cls, probe: BacklogProbe, relay_batch_size: int, *, metrics: Metrics
    ) -> OutboxBacklogGate:
        """A gate whose marks follow the relay's pass size (`backlog_marks`)."""
        high, low = backlog_marks(relay_batch_size)
        return cls(probe, high=high, low=low, metrics=metrics)

    @property
    def admits_requests(self) -> bool:
        return self._open

    def observe(self, count: int) -> None:
        """A new reading of the backlog: close above `high`, open below `low`."""
        self.backlog = count
        if self._failing:
            self._failing = False
            log.info("intake gate: outbox backlog readable again (%d rows)", count)
        if self._open and count > self.high:
            self._open = False
            self._pauses.add(1)
            quiet = self._last_resume is None or (
                self._clock() - self._last_resume >= EPISODE_QUIET_S
            )
            self._episode_announced = quiet
            log.log(
                logging.WARNING if quiet else logging.DEBUG,
                "intake gate: outbox backlog over %d rows; pausing request intake until it"
                " falls below %d",
                self.high,
                self.low,
            )
        elif not self._open and count < self.low:
            self._open = True
            self._last_resume = self._clock()
            log.log(
                logging.INFO if self._episode_announced else logging.DEBUG,
                "intake gate: outbox backlog down to %d rows; resuming request intake (pauses"
                " within %.0f s are logged at DEBUG)",
                count,
                EPISODE_QUIET_S,
            )
            self._episode_announced = False

    def probe_failed(self, error: BaseException) -> None:
        """A reading that could not be taken: the state stays; logged once per outage."""
        if not self._failing:
            self._failing = True
            log.warning(
                "intake gate: cannot read the outbox backlog (%r); request intake stays %s",
                error,
                "open" if self._open else "paused",
            )

    async def probe_once(self) -> None:
        """Take one reading (bounded by PROBE_TIMEOUT_S) and feed it to the gate."""
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                count = await self._probe(self.high + 1)
        except Exception as exc:  # the probe loop is outermost: keep going, keep the state
            self.probe_failed(exc)
        else:
            self.observe(count)

    async def run(self) -> None:
        """Probe every `interval_s` until cancelled."""
        while True:
            await self.probe_once()
            await asyncio.sleep(self._interval_s)
