"""The container's running components: started in order, supervised, stopped in reverse.

The relay, the consumer and the background workers are container providers; here they
are overridden with recording stand-ins, as any test may override a provider.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest
from dependency_injector import providers

from payment.bootstrap import Container, make_container
from payment.runtime.lifecycle import RELAY_FLUSH_S, supervise
from payment.service import started
from payment.settings import Settings

WORKERS = ("reconciler", "retention", "log_budget", "refund_worker", "intake_gate")


class Events(list[str]):
    """What the stand-ins did, in order; `all_started` once every component runs."""

    def __init__(self) -> None:
        super().__init__()
        self.all_started = asyncio.Event()

    def append(self, event: str) -> None:
        super().append(event)
        if sum(e.endswith(" started") for e in self) == 2 + len(WORKERS):
            self.all_started.set()


class Relay:
    def __init__(self, events: Events) -> None:
        self.events = events
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        self.events.append("relay started")
        await self._stopped.wait()

    async def flush(self, grace_period: float = 10.0) -> int:
        self.events.append(f"relay flushed within {grace_period:g} s")
        return 0

    def stop(self) -> None:
        self.events.append("relay stopped")
        self._stopped.set()


class Consumer:
    def __init__(self, events: Events, crash: bool = False) -> None:
        self.events = events
        self.crash = crash
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        self.events.append("consumer started")
        if self.crash:
            raise RuntimeError("the broker went away")
        await self._stopping.wait()
        self.events.append("consumer drained")

    def stop(self) -> None:
        self.events.append("consumer stopping")
        self._stopping.set()


class Worker:
    def __init__(self, name: str, events: Events) -> None:
        self.name = name
        self.events = events

    async def run(self) -> None:
        self.events.append(f"{self.name} started")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.events.append(f"{self.name} cancelled")
            raise


def container_with(events: Events, *, crash: bool = False) -> Container:
    container = make_container(Settings(processor="fake"))
    container.relay.override(providers.Object(Relay(events)))
    container.consumer.override(providers.Object(Consumer(events, crash=crash)))
    for name in WORKERS:
        getattr(container, name).override(providers.Object(Worker(name, events)))
    return container


async def run_components(container: Container, stop: asyncio.Event) -> None:
    async with AsyncExitStack() as running:
        relay = await started(running, container.running_relay)
        workers = await started(running, container.running_workers)
        consumer = await started(running, container.running_consumer)
        await supervise(stop, (consumer, relay), workers)


async def test_a_stop_drains_the_consumer_then_stops_the_workers_then_flushes_the_relay() -> None:
    events = Events()
    stop = asyncio.Event()
    runner = asyncio.create_task(run_components(container_with(events), stop))
    await events.all_started.wait()
    assert events.index("relay started") < events.index("consumer started")

    stop.set()
    await runner

    stopping = events[events.index("consumer stopping") :]
    assert stopping[:2] == ["consumer stopping", "consumer drained"]
    workers_stopped = 2 + len(WORKERS)
    assert sorted(stopping[2:workers_stopped]) == sorted(f"{name} cancelled" for name in WORKERS)
    # The flush has what the drain left of its bound, at most RELAY_FLUSH_S.
    assert stopping[workers_stopped:] == [
        f"relay flushed within {RELAY_FLUSH_S:g} s",
        "relay stopped",
    ]


async def test_a_component_that_fails_ends_the_service_with_its_error_and_no_flush() -> None:
    events = Events()

    with pytest.raises(RuntimeError, match="the broker went away"):
        await run_components(container_with(events, crash=True), asyncio.Event())

    # Everything else was cancelled: nothing drained, nothing flushed after the crash.
    assert {f"{name} cancelled" for name in WORKERS} <= set(events)
    assert not [e for e in events if e.startswith("relay flushed")]
    assert "consumer drained" not in events


def test_the_runtime_components_are_container_providers() -> None:
    container = make_container(Settings(processor="fake"))
    resources = {
        name
        for name, provider in container.providers.items()
        if isinstance(provider, providers.Resource)
    }
    assert {
        "http",
        "gateway",
        "outbox_waiter",
        "collectors",
        "running_relay",
        "running_workers",
        "running_consumer",
    } <= resources
