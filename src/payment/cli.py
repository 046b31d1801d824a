"""The `payment-service` command: migrate, run, dev, demo, show, dead-letters."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from payment.settings import ConfigError, DependencyUnavailable, Settings, load_settings

if TYPE_CHECKING:
    from payment.adapters.kafka.redrive import DeadLetter
    from payment.adapters.kafka.security import KafkaSecurity


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="payment-service",
        description="Event-sourced payment service of a booking SAGA (contract v1).",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML settings (environment wins)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    migrate = sub.add_parser(
        "migrate", help="create or upgrade the database schema (safe to run again)"
    )
    migrate.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 0 if this code and the schema agree, 1 (and why) if not",
    )
    sub.add_parser("run", help="run the service: consumers, executor, relay, reconciler, HTTP")
    dev = sub.add_parser(
        "dev", help="run with zero configuration: embedded PostgreSQL and broker when unset"
    )
    dev.add_argument(
        "--fresh", action="store_true", help="wipe the embedded database (and Kafka log) first"
    )
    dev.add_argument(
        "--broker",
        choices=("tansu", "kafka"),
        default="tansu",
        help=(
            "the embedded broker when PAYMENT_KAFKA_BOOTSTRAP_SERVERS is unset: tansu (default,"
            " no Java needed) or kafka (a local Apache Kafka; needs java and mvn)"
        ),
    )
    dev.add_argument(
        "--demo", type=int, metavar="N", default=0, help="also play N booking requests"
    )
    demo = sub.add_parser("demo", help="play the booking saga against a running service over Kafka")
    demo.add_argument("--count", type=int, default=200, metavar="N", help="booking requests")
    demo.add_argument("--timeout", type=float, default=120.0, metavar="S")
    show = sub.add_parser("show", help="print a payment's event stream and its outbox state")
    target = show.add_mutually_exclusive_group(required=True)
    target.add_argument("payment_id", nargs="?", help="the payment id")
    target.add_argument("--booking", metavar="BOOKING_ID", help="find the payment by booking")
    _dead_letters_parser(sub)
    return parser


def _dead_letters_parser(sub: Any) -> None:
    dead = sub.add_parser(
        "dead-letters", help="inspect the dead-letter topic and re-drive parked messages"
    )
    actions = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list",
        help="every dead letter: where it came from, why, its size (never its payload)",
    )
    listing.add_argument(
        "--show-payload",
        action="store_true",
        help="also print each payload (card numbers and secrets masked)",
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.add_argument("--timeout", type=float, default=60.0, metavar="S")
    again = actions.add_parser(
        "redrive",
        help="re-publish parked records to their original topic, each at most once",
    )
    again.add_argument(
        "refs", nargs="*", metavar="PARTITION:OFFSET", help="dead letters, as `list` names them"
    )
    again.add_argument("--all", action="store_true", help="every dead letter not yet re-driven")
    again.add_argument("--dry-run", action="store_true", help="say what would be re-driven")
    again.add_argument("--timeout", type=float, default=60.0, metavar="S")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(config_file=args.config)
        if args.command == "migrate":
            return asyncio.run(_check_schema(settings) if args.check else _migrate(settings))
        if args.command == "run":
            return _run(settings)
        if args.command == "dev":
            from payment.devmode import run_dev

            return run_dev(settings, fresh=args.fresh, demo=args.demo, broker=args.broker)
        if args.command == "demo":
            return asyncio.run(_demo(settings, args.count, args.timeout))
        if args.command == "show":
            return asyncio.run(_show(settings, args.payment_id, args.booking))
        if args.command == "dead-letters":
            return asyncio.run(_dead_letters(settings, args))
    except ConfigError as exc:
        print(f"payment-service: configuration error: {exc}", file=sys.stderr)
        return 2
    except DependencyUnavailable as exc:
        print(f"payment-service: dependency unavailable: {exc}", file=sys.stderr)
        return 3
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
        refund=settings.topic_refund,
        refunded=settings.topic_refunded,
        refund_failed=settings.topic_refund_failed,
    )
    report = await run_demo(
        settings.kafka_bootstrap_servers,
        count=count,
        topics=topics,
        enable_idempotence=settings.kafka_enable_idempotence,
        timeout_s=timeout_s,
        security=await _checked_kafka_security(settings),
    )
    return 0 if report.ok else 1


async def _checked_kafka_security(settings: Settings) -> KafkaSecurity:
    """The Kafka clients' security settings, once a broker accepted them (else one line)."""
    from payment.bootstrap import check_kafka, make_container

    security: KafkaSecurity = make_container(settings).kafka_security()
    await check_kafka(str(settings.kafka_bootstrap_servers), security)
    return security


def _require_database(settings: Settings) -> str:
    if not settings.database_url:
        raise ConfigError("PAYMENT_DATABASE_URL: not set (dev starts an embedded PostgreSQL)")
    return settings.database_url


async def _migrate(settings: Settings) -> int:
    from payment.adapters.postgres.migrations import migrate
    from payment.bootstrap import check_postgres

    url = _require_database(settings)
    await check_postgres(url)  # a refused or unanswered connection: one line, exit 2 or 3
    applied = await migrate(url)
    if applied:
        print(f"migrate: applied {', '.join(f'{v:04d}' for v in applied)}")
    else:
        print("migrate: schema is up to date")
    return 0


async def _check_schema(settings: Settings) -> int:
    import psycopg

    from payment.adapters.postgres.migrations import check_schema

    try:
        result = await check_schema(_require_database(settings))
    except psycopg.OperationalError as exc:
        # The type only: a connection error's text may quote the URL.
        print(f"migrate --check: cannot reach the database ({type(exc).__name__})", file=sys.stderr)
        return 1
    print(f"migrate --check: {result.line}", file=sys.stdout if result.agrees else sys.stderr)
    return 0 if result.agrees else 1


def _run(settings: Settings) -> int:
    from payment.application import failpoints
    from payment.bootstrap import Service, configure_logging, run_until_signalled

    try:
        # Crash tests only (PAYMENT_FAILPOINTS); unset in production, and then free.
        armed = failpoints.arm_from_environment()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    configure_logging(settings)
    if armed:
        logging.getLogger("payment").warning("failpoints armed: %s", ", ".join(armed))
    service = Service(settings)
    asyncio.run(run_until_signalled(service))
    return 0


async def _show(settings: Settings, payment_id: str | None, booking: str | None) -> int:
    from payment.adapters.postgres.queries import render_payment
    from payment.bootstrap import check_postgres

    url = _require_database(settings)
    await check_postgres(url)
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


_REF = re.compile(r"(\d+):(\d+)")


async def _dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    from payment.adapters.kafka.redrive import read_dead_letters

    if not settings.kafka_bootstrap_servers:
        raise ConfigError("PAYMENT_KAFKA_BOOTSTRAP_SERVERS: not set")
    topic = settings.topic_dead_letter
    if args.action == "redrive":
        refs: list[str] = list(args.refs)
        bad = [ref for ref in refs if not _REF.fullmatch(ref)]
        if bad or bool(refs) == bool(args.all):
            print(
                "dead-letters redrive: give PARTITION:OFFSET refs (as `list` prints them)"
                " or --all, not both",
                file=sys.stderr,
            )
            return 2
        url = _require_database(settings)
    security = await _checked_kafka_security(settings)
    letters = await read_dead_letters(
        settings.kafka_bootstrap_servers, topic, timeout_s=args.timeout, security=security
    )
    if args.action == "list":
        return await _list_dead_letters(settings, letters, args.show_payload, args.json)
    return await _redrive(
        settings, url, letters, None if args.all else refs, args.dry_run, security
    )


async def _list_dead_letters(
    settings: Settings, letters: Sequence[DeadLetter], show_payload: bool, as_json: bool
) -> int:
    import json

    from payment.adapters.postgres.redrives import PostgresRedriveLedger, Redriven

    topic = settings.topic_dead_letter
    redriven: dict[tuple[int, int], Redriven] | None = None
    if settings.database_url:
        import psycopg

        try:
            async with PostgresRedriveLedger.connect(settings.database_url) as ledger:
                redriven = await ledger.redriven(topic)
        except psycopg.errors.UndefinedTable:
            redriven = {}  # not migrated to 0003 yet: nothing was ever re-driven
    done = 0
    lines: list[str] = []
    for dl in letters:
        status = "unknown" if redriven is None else "parked"
        if redriven is not None and (mark := redriven.get((dl.partition, dl.offset))):
            done += 1
            status = (
                "redriven" if mark.offset is None else f"redriven:{mark.partition}:{mark.offset}"
            )
        facts = dl.summary(redriven=status)
        if as_json:
            if show_payload:
                facts["payload"] = dl.payload()
            lines.append(json.dumps(facts, ensure_ascii=False))
            continue
        origin = (
            f"{facts['original_topic']}[{facts['original_partition']}]@{facts['original_offset']}"
        )
        lines.append(
            f"{dl.ref:<8} {origin:<40} {dl.size:>8} B  {status:<12}"
            f" type={facts['ce_type']} id={facts['ce_id']}  reason: {facts['reason']}"
        )
        if show_payload:
            lines.append(f"         payload: {dl.payload()}")
    if not as_json:
        print(f"{topic}: {len(letters)} dead letters, {done} re-driven")
    if lines:
        print("\n".join(lines))
    return 0


async def _redrive(
    settings: Settings,
    url: str,
    letters: Sequence[DeadLetter],
    refs: list[str] | None,
    dry_run: bool,
    security: KafkaSecurity | None = None,
) -> int:
    from payment.adapters.kafka.producer import create_producer
    from payment.adapters.kafka.redrive import redrive
    from payment.adapters.postgres.migrations import migrate
    from payment.adapters.postgres.redrives import PostgresRedriveLedger

    assert settings.kafka_bootstrap_servers is not None
    topic = settings.topic_dead_letter
    await migrate(url)  # the ledger table (0003)
    producer = create_producer(
        settings.kafka_bootstrap_servers,
        enable_idempotence=settings.kafka_enable_idempotence,
        client_id="payment-service-redrive",
        security=security,
    )
    async with PostgresRedriveLedger.connect(url) as ledger:
        already = set(await ledger.redriven(topic))
        await producer.start()
        try:
            results = await redrive(
                letters,
                refs,
                dlq_topic=topic,
                allowed_topics=(settings.topic_request, settings.topic_initiated),
                ledger=ledger,
                producer=producer,
                already=already,
                dry_run=dry_run,
            )
        finally:
            await producer.stop()
    for result in results:
        print(
            f"{result.ref}: {result.outcome.replace('_', ' ')}"
            + (f" ({result.detail})" if result.detail else "")
        )
    counts = {o: sum(r.outcome == o for r in results) for o in ("redriven", "already_redriven")}
    print(
        f"dead-letters redrive: {counts['redriven']} re-driven,"
        f" {counts['already_redriven']} already re-driven, {len(results)} asked"
    )
    failed = [r for r in results if r.outcome in ("not_found", "refused")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
