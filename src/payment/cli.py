"""The `payment-service` command: migrate, run, dev, demo, show, dead-letters, review."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from payment.settings import (
    EXIT_CONFIGURATION,
    EXIT_UNAVAILABLE,
    ConfigError,
    DependencyUnavailable,
    Settings,
    load_settings,
)

if TYPE_CHECKING:
    from payment.adapters.kafka.redrive import DeadLetter
    from payment.adapters.kafka.security import KafkaSecurity


_CONFIG_HELP = "TOML settings file, keys as in the README without PAYMENT_ (environment wins)"


def _config_option() -> argparse.ArgumentParser:
    """`--config` for every subcommand too, so it works before or after the command name."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=_CONFIG_HELP)
    return common


def _parser() -> argparse.ArgumentParser:
    from payment.adapters.observability.metrics import package_version

    common = _config_option()
    parser = argparse.ArgumentParser(
        prog="payment-service",
        description=(
            "Event-sourced payment service of a booking SAGA (contract v2). Exit codes:"
            " 0 ok, 1 the command's own failure, 2 configuration error,"
            " 3 a dependency (database, broker, topics, schema) is unavailable."
        ),
    )
    parser.add_argument("--config", metavar="FILE", default=None, help=_CONFIG_HELP)
    parser.add_argument(
        "--version", action="version", version=f"payment-service {package_version()}"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    migrate = sub.add_parser(
        "migrate",
        parents=[common],
        help="create or upgrade the database schema (safe to run again)",
    )
    migrate.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 0 if this code and the schema agree, 1 (and why) if not",
    )
    sub.add_parser(
        "run",
        parents=[common],
        help="run the service: consumers, executor, relay, reconciler, HTTP",
    )
    dev = sub.add_parser(
        "dev",
        parents=[common],
        help="run with zero configuration: embedded PostgreSQL and broker when unset",
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
        "--demo",
        type=int,
        metavar="N",
        default=0,
        help="also play N booking requests (a count; default 0: none)",
    )
    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="play the booking saga against a running service over Kafka",
    )
    demo.add_argument(
        "--count", type=int, default=200, metavar="N", help="booking requests (default 200)"
    )
    demo.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds to wait for every outcome (default 120)",
    )
    show = sub.add_parser(
        "show", parents=[common], help="print a payment's event stream and its outbox state"
    )
    target = show.add_mutually_exclusive_group(required=True)
    target.add_argument("payment_id", nargs="?", help="the payment id")
    target.add_argument("--booking", metavar="BOOKING_ID", help="find the payment by booking")
    _dead_letters_parser(sub, common)
    _review_parser(sub, common)
    return parser


def _review_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    review = sub.add_parser(
        "review",
        parents=[common],
        help="payments flagged for manual review: list them, resolve one without SQL",
    )
    actions = review.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list", parents=[common], help="every payment flagged for review and not resolved yet"
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    resolve = actions.add_parser(
        "resolve",
        parents=[common],
        help=(
            "look the payment up at the gateway, then record its outcome (who, why) and"
            " publish it; refused when the gateway's answer does not back the outcome"
        ),
    )
    resolve.add_argument("payment_id", metavar="PAYMENT_ID", help="the payment id (a UUID)")
    resolve.add_argument(
        "--outcome",
        choices=("completed", "failed"),
        required=True,
        help="what the gateway shows: completed (charged) or failed (declined or no charge)",
    )
    resolve.add_argument("--reason", required=True, metavar="TEXT", help="why (stored)")
    resolve.add_argument(
        "--by", required=True, metavar="NAME", help="who resolves it (stored with the outcome)"
    )
    resolve.add_argument(
        "--force",
        action="store_true",
        help="record the outcome even when the gateway disagrees (the override is stored)",
    )


def _dead_letters_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    dead = sub.add_parser(
        "dead-letters",
        parents=[common],
        help="inspect the dead-letter topic and re-drive parked messages",
    )
    actions = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list",
        parents=[common],
        help="every dead letter: where it came from, why, its size (never its payload)",
    )
    listing.add_argument(
        "--show-payload",
        action="store_true",
        help="also print each payload (card numbers and secrets masked)",
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.add_argument("--timeout", type=float, default=60.0, metavar="S", help=_READ_TIMEOUT)
    again = actions.add_parser(
        "redrive",
        parents=[common],
        help="re-publish parked records to their original topic, each at most once",
    )
    again.add_argument(
        "refs", nargs="*", metavar="PARTITION:OFFSET", help="dead letters, as `list` names them"
    )
    again.add_argument("--all", action="store_true", help="every dead letter not yet re-driven")
    again.add_argument("--dry-run", action="store_true", help="say what would be re-driven")
    again.add_argument("--timeout", type=float, default=60.0, metavar="S", help=_READ_TIMEOUT)


_READ_TIMEOUT = "seconds to read the dead-letter topic to its end (default 60)"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings: Settings | None = None
    try:
        settings = load_settings(config_file=args.config)
        return _dispatch(args, settings)
    except ConfigError as exc:
        return _fail("configuration error", str(exc), EXIT_CONFIGURATION, exc, settings)
    except DependencyUnavailable as exc:
        return _fail("dependency unavailable", str(exc), EXIT_UNAVAILABLE, exc, settings)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the outermost loop: a dependency's error becomes one line
        line = _dependency_failure(exc, settings)
        if line is None:
            raise
        return _fail("dependency unavailable", line, EXIT_UNAVAILABLE, exc, settings)


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command not in ("run", "dev") and settings.log_level.upper() != "DEBUG":
        # The operator tools answer in their own words; the Kafka client's retries and
        # connection errors would only repeat the one line a failure ends with.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    if args.command == "migrate":
        return asyncio.run(_check_schema(settings) if args.check else _migrate(settings))
    if args.command == "run":
        return _run(settings)
    if args.command == "dev":
        from payment.devtools.devmode import run_dev

        return run_dev(settings, fresh=args.fresh, demo=args.demo, broker=args.broker)
    if args.command == "demo":
        return asyncio.run(_demo(settings, args.count, args.timeout))
    if args.command == "show":
        return asyncio.run(_show(settings, args.payment_id, args.booking))
    if args.command == "dead-letters":
        return asyncio.run(_dead_letters(settings, args))
    if args.command == "review":
        return asyncio.run(_review(settings, args))
    return EXIT_CONFIGURATION


def _dependency_failure(exc: BaseException, settings: Settings | None) -> str | None:
    """One line for an error of the database or the broker (None: not theirs, a bug)."""
    import psycopg
    import psycopg_pool
    from aiokafka.errors import KafkaError

    from payment.adapters.startup import broker_failure, database_failure

    if settings is None:
        return None
    if isinstance(exc, psycopg.OperationalError | psycopg_pool.PoolTimeout):
        return database_failure(exc, str(settings.database_url))
    if isinstance(exc, KafkaError):
        return broker_failure(exc, str(settings.kafka_bootstrap_servers))
    return None


def _fail(kind: str, line: str, code: int, exc: BaseException, settings: Settings | None) -> int:
    """Write one line (text, or JSON with PAYMENT_LOG_FORMAT=json) and return `code`.

    The traceback follows only with PAYMENT_LOG_LEVEL=DEBUG.
    """
    import json
    import os
    import traceback
    from datetime import UTC, datetime

    from payment.adapters.observability.logs import redact

    level = (settings.log_level if settings else os.environ.get("PAYMENT_LOG_LEVEL", "")).upper()
    fmt = settings.log_format if settings else os.environ.get("PAYMENT_LOG_FORMAT", "text")
    trace = "".join(traceback.format_exception(exc)) if level == "DEBUG" else None
    line = redact(line)
    if fmt == "json":
        record: dict[str, object] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": "ERROR",
            "logger": "payment.cli",
            "message": f"{kind}: {line}",
            "failure": "configuration" if code == EXIT_CONFIGURATION else "unavailable",
            "exit_code": code,
        }
        if trace is not None:
            record["exception"] = redact(trace)
        print(json.dumps(record, ensure_ascii=False), file=sys.stderr)
    else:
        print(f"payment-service: {kind}: {line}", file=sys.stderr)
        if trace is not None:
            print(redact(trace), file=sys.stderr, end="")
    return code


async def _demo(settings: Settings, count: int, timeout_s: float) -> int:
    from payment.adapters.kafka.topics import Topics
    from payment.devtools.demo import run_demo

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
    from payment.adapters.postgres.migrations import MigrationError, migrate
    from payment.bootstrap import check_postgres

    url = _require_database(settings)
    await check_postgres(url)  # a refused or unanswered connection: one line, exit 2 or 3
    try:
        applied = await migrate(url)
    except MigrationError as exc:
        raise DependencyUnavailable(f"database schema: {exc}") from exc
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


async def _review(settings: Settings, args: argparse.Namespace) -> int:
    import json

    url = _require_database(settings)
    if args.action == "list":
        from payment.adapters.postgres.review_queries import open_reviews

        reviews = await open_reviews(url)
        if not args.json:
            print(f"{len(reviews)} payments flagged for review")
        for r in reviews:
            flagged = r.flagged_at.isoformat(timespec="seconds")
            if args.json:
                facts = {
                    "payment_id": str(r.payment_id),
                    "booking_id": r.booking_id,
                    "amount": r.amount,
                    "currency": r.currency,
                    "flagged_at": flagged,
                    "detail": r.detail,
                }
                print(json.dumps(facts, ensure_ascii=False))
            else:
                print(
                    f"{r.payment_id}  booking={r.booking_id}  {r.amount} {r.currency}"
                    f"  flagged {flagged}: {r.detail}"
                )
        return 0
    return await _resolve_review(settings, args)


async def _resolve_review(settings: Settings, args: argparse.Namespace) -> int:
    from payment.application.commands import ResolveReview
    from payment.application.review import NoSuchPayment
    from payment.bootstrap import resolve_review_now
    from payment.domain.errors import IllegalTransition, ReviewDisagreesWithGateway

    try:
        payment_id = uuid.UUID(args.payment_id)
    except ValueError:
        print(f"review resolve: not a payment id (UUID): {args.payment_id[:64]!r}", file=sys.stderr)
        return EXIT_CONFIGURATION
    cmd = ResolveReview(
        payment_id=payment_id,
        outcome=args.outcome,
        reason=args.reason,
        resolved_by=args.by,
        force=args.force,
    )
    try:
        resolution, found = await resolve_review_now(settings, cmd)
    except NoSuchPayment:
        print("review resolve: no such payment", file=sys.stderr)
        return 1
    except ReviewDisagreesWithGateway as exc:
        print(
            f"review resolve: refused: {exc}; nothing recorded (check the gateway, or"
            " --force to record it anyway)",
            file=sys.stderr,
        )
        return 1
    except IllegalTransition as exc:
        print(f"review resolve: refused: {exc}", file=sys.stderr)
        return 1
    forced = " (forced against the gateway)" if resolution.forced else ""
    print(
        f"review resolve: {payment_id} {resolution.outcome}{forced}; the gateway answered"
        f" {found.answer}{f' ({found.reference})' if found.reference else ''};"
        f" recorded by {resolution.resolved_by}; payment.{resolution.outcome} queued for"
        " publication"
    )
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
    from payment.adapters.postgres.migrations import check_schema
    from payment.adapters.postgres.redrives import PostgresRedriveLedger

    assert settings.kafka_bootstrap_servers is not None
    topic = settings.topic_dead_letter
    # The ledger table (0003) must exist; the runtime role may not create it.
    schema = await check_schema(url)
    if not schema.agrees:
        raise DependencyUnavailable(f"database schema: {schema.line}")
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
