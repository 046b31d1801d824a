"""The `payment-service` command: migrate, run, dev, show."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Sequence

from payment.settings import ConfigError, Settings, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="payment-service",
        description="Event-sourced payment service of a booking SAGA (contract v1).",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML settings (environment wins)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("migrate", help="create or upgrade the database schema (safe to run again)")
    sub.add_parser("run", help="run the service: consumers, executor, relay, reconciler, HTTP")
    dev = sub.add_parser(
        "dev", help="run with zero configuration: embedded PostgreSQL and broker when unset"
    )
    dev.add_argument("--fresh", action="store_true", help="wipe the embedded database first")
    dev.add_argument(
        "--demo", type=int, metavar="N", default=0, help="also play N booking requests"
    )
    demo = sub.add_parser(
        "demo", help="play the booking saga against a running service over Kafka"
    )
    demo.add_argument("--count", type=int, default=200, metavar="N", help="booking requests")
    demo.add_argument("--timeout", type=float, default=120.0, metavar="S")
    show = sub.add_parser("show", help="print a payment's event stream and its outbox state")
    target = show.add_mutually_exclusive_group(required=True)
    target.add_argument("payment_id", nargs="?", help="the payment id")
    target.add_argument("--booking", metavar="BOOKING_ID", help="find the payment by booking")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(config_file=args.config)
        if args.command == "migrate":
            return asyncio.run(_migrate(settings))
        if args.command == "run":
            return _run(settings)
        if args.command == "dev":
            from payment.devmode import run_dev

            return run_dev(settings, fresh=args.fresh, demo=args.demo)
        if args.command == "demo":
            return asyncio.run(_demo(settings, args.count, args.timeout))
        if args.command == "show":
            return asyncio.run(_show(settings, args.payment_id, args.booking))
    except ConfigError as exc:
        print(f"payment-service: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


async def _demo(settings: Settings, count: int, timeout_s: float) -> int:
    from payment.adapters.kafka.topics import Topics
    from payment.demo import run_demo

    if not settings.kafka_bootstrap_servers:
        raise ConfigError("PAYMENT_KAFKA_BOOTSTRAP_SERVERS: not set (or use `dev --demo N`)")
    if count < 1:
        print("demo: --count must be at least 1", file=sys.stderr)
        return 2
    topics = Topics(
        request=settings.topic_request,
        initiated=settings.topic_initiated,
        completed=settings.topic_completed,
        failed=settings.topic_failed,
        dead_letter=settings.topic_dead_letter,
    )
    report = await run_demo(
        settings.kafka_bootstrap_servers,
        count=count,
        topics=topics,
        enable_idempotence=settings.kafka_enable_idempotence,
        timeout_s=timeout_s,
    )
    return 0 if report.ok else 1


def _require_database(settings: Settings) -> str:
    if not settings.database_url:
        raise ConfigError("PAYMENT_DATABASE_URL: not set (dev starts an embedded PostgreSQL)")
    return settings.database_url


async def _migrate(settings: Settings) -> int:
    from payment.adapters.postgres.migrations import migrate

    applied = await migrate(_require_database(settings))
    if applied:
        print(f"migrate: applied {', '.join(f'{v:04d}' for v in applied)}")
    else:
        print("migrate: schema is up to date")
    return 0


def _run(settings: Settings) -> int:
    from payment.bootstrap import Service, configure_logging, run_until_signalled

    configure_logging(settings)
    service = Service(settings)
    asyncio.run(run_until_signalled(service))
    return 0


async def _show(settings: Settings, payment_id: str | None, booking: str | None) -> int:
    from payment.adapters.postgres.queries import render_payment

    url = _require_database(settings)
    pid: uuid.UUID | None = None
    if payment_id is not None:
        try:
            pid = uuid.UUID(payment_id)
        except ValueError:
            print(f"show: not a payment id (UUID): {payment_id[:64]!r}", file=sys.stderr)
            return 2
    lines = await render_payment(url, payment_id=pid, booking_id=booking)
    if lines is None:
        print("show: no such payment", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
