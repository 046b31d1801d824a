"""`payment-service dev`: the service with an embedded PostgreSQL and broker when unset."""

from __future__ import annotations

import asyncio
import signal
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar

import msgspec
import platformdirs

from payment.settings import Settings, dev_defaults

if TYPE_CHECKING:
    from payment.service import Service


# Tansu answers a fetch only when its wait expires: a short wait keeps each hop fast.
TANSU_FETCH_MAX_WAIT_MS = 10
EmbeddedBrokerKind = Literal["tansu", "kafka"]


def data_dir() -> Path:
    """Where the embedded PostgreSQL keeps its cluster between runs."""
    return Path(platformdirs.user_data_dir("payment-service")) / "postgres"


def kafka_data_dir() -> Path:
    """Where `dev --broker kafka` keeps its Kafka log between runs."""
    return Path(platformdirs.user_data_dir("payment-service")) / "kafka"


def run_dev(
    settings: Settings, *, fresh: bool = False, demo: int = 0, broker: EmbeddedBrokerKind = "tansu"
) -> int:
    """Start what is missing, then run the service (the `run` code path) until stopped.

    With `demo` > 0, the demo orchestrator plays that many requests once the service is
    ready; the service stops when it is done and the exit code says whether every
    request reached a terminal event.
    """
    from payment.devtools.embedded import EmbeddedError

    try:
        return _run_dev(settings, fresh=fresh, demo=demo, broker=broker)
    except EmbeddedError as exc:
        print(f"payment-service dev: {exc}", file=sys.stderr)
        return 3


def _run_dev(settings: Settings, *, fresh: bool, demo: int, broker: EmbeddedBrokerKind) -> int:
    from payment.devtools.embedded import EmbeddedBroker, EmbeddedPostgres
    from payment.service import Service, configure_logging

    # The fake, migrations on start and topic creation on a single node, unless set.
    settings = dev_defaults(settings)
    configure_logging(settings)
    with ExitStack() as stack:
        # SIGTERM must unwind this stack (stopping the children) like Ctrl-C does.
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        stack.callback(signal.signal, signal.SIGTERM, previous)
        changes: dict[str, object] = {}
        if not settings.database_url:
            pg = _started(stack, EmbeddedPostgres(data_dir(), fresh=fresh))
            print(
                f"dev: embedded PostgreSQL listening on {pg.url} (data in {pg.data_dir})",
                flush=True,
            )
            changes["database_url"] = pg.url
        if not settings.kafka_bootstrap_servers and broker == "kafka":
            changes["kafka_bootstrap_servers"] = _start_apache_kafka(stack, fresh=fresh)
        elif not settings.kafka_bootstrap_servers:
            tansu = _started(stack, EmbeddedBroker())
            print(
                f"dev: embedded Kafka-compatible broker listening on {tansu.bootstrap_servers}",
                flush=True,
            )
            changes["kafka_bootstrap_servers"] = tansu.bootstrap_servers
            # Tansu has no idempotent producer, and answers a fetch only when its wait
            # expires: a short wait keeps the latency per hop low.
            changes["kafka_enable_idempotence"] = False
            changes["kafka_fetch_max_wait_ms"] = TANSU_FETCH_MAX_WAIT_MS
        settings = msgspec.structs.replace(settings, **changes)
        # Restore the default handler inside asyncio.run: the service installs its own.
        signal.signal(signal.SIGTERM, previous)
        try:
            service = Service(settings)
            return asyncio.run(_serve(service, settings, demo))
        except KeyboardInterrupt:
            return 130


class _Process(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


_P = TypeVar("_P", bound=_Process)


def _started(stack: ExitStack, process: _P) -> _P:
    """`process` started, and stopped when `stack` unwinds (even if it fails to start)."""
    stack.callback(process.stop)
    process.start()
    return process


def _start_apache_kafka(stack: ExitStack, *, fresh: bool) -> str:
    """A local Apache Kafka with its log kept between runs; the service's defaults hold."""
    import shutil

    from payment.devtools.apache_kafka import ApacheKafkaBroker

    directory = kafka_data_dir()
    if fresh:
        shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)
    kafka = ApacheKafkaBroker(data_dir=directory)
    stack.callback(kafka.close)
    kafka.start()
    print(
        f"dev: Apache Kafka {kafka.version} listening on {kafka.bootstrap_servers} "
        f"(log in {directory}, ready in {kafka.started_in_s or 0:.1f} s)",
        flush=True,
    )
    return kafka.bootstrap_servers


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


async def _serve(service: Service, settings: Settings, demo: int) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop)
    runner = asyncio.create_task(service.run())
    if demo <= 0:
        await runner
        return 0
    from payment.devtools.demo import run_demo

    topics = service.container.topics()
    # Play once the consumer has joined its group, so the demo's latencies measure the
    # service, not the broker's first group join.
    joined = asyncio.create_task(service.joined.wait())
    await asyncio.wait({joined, runner}, return_when=asyncio.FIRST_COMPLETED)
    joined.cancel()
    demo_task = asyncio.create_task(
        run_demo(
            str(settings.kafka_bootstrap_servers),
            count=demo,
            topics=topics,
            enable_idempotence=settings.kafka_enable_idempotence,
            security=service.container.kafka_security(),
        )
    )
    done, _ = await asyncio.wait({runner, demo_task}, return_when=asyncio.FIRST_COMPLETED)
    if runner in done:
        demo_task.cancel()
        runner.result()
        print("dev: the service stopped before the demo finished", file=sys.stderr)
        return 1
    report = demo_task.result()
    service.stop()
    await runner
    return 0 if report.ok else 1
