"""`payment-service run`, `dev` and `demo`: the service, and the tools that start it
with embedded dependencies or play the booking saga against it (payment.devtools,
imported only by the command that uses it)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from payment.cli.common import checked_kafka_security
from payment.settings import ConfigError, Settings


def command(settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "run":
        return run(settings)
    if args.command == "dev":
        from payment.devtools.devmode import run_dev
        from payment.runtime.crash_reports import report_native_crashes

        report_native_crashes()  # the service runs in this process, as under `run`
        return run_dev(settings, fresh=args.fresh, demo=args.demo, broker=args.broker)
    return asyncio.run(demo(settings, args.count, args.timeout))


def run(settings: Settings) -> int:
    from payment.application import failpoints
    from payment.runtime.crash_reports import report_native_crashes
    from payment.runtime.garbage_collection import settle_start_up_objects
    from payment.service import Service, configure_logging, run_until_signalled

    try:
        # Crash tests only (PAYMENT_FAILPOINTS); unset in production, and then free.
        armed = failpoints.arm_from_environment()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    report_native_crashes()
    configure_logging(settings)
    if armed:
        logging.getLogger("payment").warning("failpoints armed: %s", ", ".join(armed))
    service = Service(settings)
    settle_start_up_objects()
    asyncio.run(run_until_signalled(service))
    return 0


async def demo(settings: Settings, count: int, timeout_s: float) -> int:
    from payment.bootstrap import make_container
    from payment.devtools.demo import run_demo

    if not settings.kafka_bootstrap_servers:
        raise ConfigError("PAYMENT_KAFKA_BOOTSTRAP_SERVERS: not set (or use `dev --demo N`)")
    if count < 1:
        print("demo: --count must be at least 1", file=sys.stderr)
        return 2
    report = await run_demo(
        settings.kafka_bootstrap_servers,
        count=count,
        topics=make_container(settings).topics(),
        enable_idempotence=settings.kafka_enable_idempotence,
        timeout_s=timeout_s,
        security=await checked_kafka_security(settings),
    )
    return 0 if report.ok else 1
