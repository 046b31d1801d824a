"""The running parts of `run` as container resources: each starts on init and stops on
shutdown, gracefully while the service stops (the consumer drains, the relay flushes),
at once when a crash already cancelled it. `supervise` watches them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol

from payment.adapters.kafka.consumer import KafkaInboxConsumer
from payment.adapters.kafka.relay import KafkaOutboxRelay
from payment.adapters.observability.http import HealthServer
from payment.adapters.observability.metrics import Metrics
from payment.adapters.postgres.outbox import OutboxWaiter, wait_for_outbox_notification
from payment.settings import DRAIN_TIMEOUT_S, DependencyUnavailable

log = logging.getLogger("payment")

# On SIGTERM, after the consumer's drain: how long the relay may flush the outbox, and then
# finish its pass (README, "Exit codes" and the grace period).
RELAY_FLUSH_S = 10.0
RELAY_STOP_S = 1.0


class Runnable(Protocol):
    def run(self) -> Coroutine[Any, Any, None]: ...


async def http_server(
    host: str, port: int, readiness: Callable[[], Awaitable[dict[str, str]]], metrics: Metrics
) -> AsyncIterator[HealthServer]:
    """/health/live, /health/ready and /metrics: liveness answers from the first second."""
    server = HealthServer(host, port, readiness, metrics.render)
    try:
        await server.start()
    except OSError as exc:
        raise DependencyUnavailable(
            f"HTTP {host}:{port}: cannot listen ({exc.strerror}): check"
            " PAYMENT_HTTP_HOST and PAYMENT_HTTP_PORT"
        ) from exc
    try:
        yield server
    finally:
        await server.stop()


async def open_gateway(processor: Any) -> AsyncIterator[Any]:
    """The configured gateway, closed at shutdown (the Stripe adapter's HTTP client; the
    fake has nothing to close)."""
    try:
        yield processor
    finally:
        closer = getattr(processor, "aclose", None)
        if closer is not None:
            await closer()


async def outbox_waiter(database_url: str) -> AsyncIterator[OutboxWaiter]:
    """The relay's wake-up call on each new outbox row (PostgreSQL LISTEN/NOTIFY)."""
    waiter = wait_for_outbox_notification(database_url)
    try:
        yield waiter
    finally:
        await waiter.aclose()


class StopDeadline:
    """How long the stop may still take: the consumer's drain bound, counted from the
    moment the drain starts; the relay's flush fits in what the drain leaves of it."""

    def __init__(self, seconds: float = DRAIN_TIMEOUT_S) -> None:
        self._seconds = seconds
        self._at: float | None = None

    def start(self) -> None:
        self._at = asyncio.get_running_loop().time() + self._seconds

    def left(self) -> float:
        if self._at is None:
            return self._seconds
        return max(0.0, self._at - asyncio.get_running_loop().time())


Stopping = Callable[[Any, "asyncio.Task[None]", StopDeadline], Awaitable[None]]


async def running(
    component: Runnable, name: str, stopping: Stopping, deadline: StopDeadline
) -> AsyncIterator[asyncio.Task[None]]:
    """`component` running as task `name`; at shutdown `stopping` ends it gracefully,
    unless a crash already cancelled it."""
    task = asyncio.create_task(component.run(), name=name)
    try:
        yield task
    finally:
        if not task.done():
            await stopping(component, task, deadline)
        elif not task.cancelled() and task.exception() is not None:
            # It ended on its own while the service was stopping: say so, or it is lost.
            log.error("run: %s had failed: %r", name, task.exception())


async def drain(
    consumer: KafkaInboxConsumer, task: asyncio.Task[None], deadline: StopDeadline
) -> None:
    """The consumer's stop: the messages in flight are finished first (within
    DRAIN_TIMEOUT_S, the consumer's own bound)."""
    log.info("run: stopping: draining in-flight messages")
    deadline.start()
    consumer.stop()
    await ended_or_logged(task, "the consumer")


async def flush(relay: KafkaOutboxRelay, task: asyncio.Task[None], deadline: StopDeadline) -> None:
    """The relay's stop: what is written is published first, within what the drain left
    of the stop's bound (RELAY_FLUSH_S at most); a pass still waiting for
    acknowledgements is then cut and its rows stay pending."""
    log.info("run: flushing the outbox relay")
    await relay.flush(min(RELAY_FLUSH_S, deadline.left()))
    relay.stop()
    await stop_within(task, RELAY_STOP_S)


async def ended_or_logged(task: asyncio.Task[None], what: str) -> None:
    """Wait for a stopping task; log, not raise, how it failed: the stop goes on.

    With the broker gone the Kafka client's own close can fail, even with a
    CancelledError of its own (not this task's); the work it leaves uncommitted is
    handled again after the restart.
    """
    await asyncio.wait({task})
    if task.cancelled():
        log.warning("run: %s did not stop cleanly: its close was cancelled", what)
    elif (error := task.exception()) is not None:
        log.error("run: %s did not stop cleanly", what, exc_info=error)


async def stop_within(task: asyncio.Task[None], seconds: float) -> None:
    """Wait up to `seconds` for a stopping task to end, then cancel it."""
    await asyncio.wait({task}, timeout=seconds)
    if not task.done():
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def running_in_background(**workers: Runnable) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Periodic workers (each task named after its keyword); cancelled at shutdown."""
    tasks = [
        asyncio.create_task(worker.run(), name=name.replace("_", "-"))
        for name, worker in workers.items()
    ]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def supervise(
    stop: asyncio.Event,
    essential: Sequence[asyncio.Task[None]],
    background: Sequence[asyncio.Task[None]],
) -> None:
    """Return once `stop` is set. An essential task that ends before is a crash: every
    task is cancelled (before the pools and the producer close under them) and its error
    raised."""
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({stopper, *essential}, return_when=asyncio.FIRST_COMPLETED)
    if stopper in done:
        return
    everything: list[asyncio.Task[Any]] = [stopper, *essential, *background]
    for running in everything:
        running.cancel()
    await asyncio.gather(*everything, return_exceptions=True)
    for finished in done:
        finished.result()
