"""The command line: every command, option and help text (CONTRACT.md: a contract)."""

from __future__ import annotations

import argparse
from typing import Any

_CONFIG_HELP = "TOML settings file, keys as in the README without PAYMENT_ (environment wins)"
_READ_TIMEOUT = "seconds to read the dead-letter topic to its end (default 60)"


def _config_option() -> argparse.ArgumentParser:
    """`--config` for every subcommand too, so it works before or after the command name."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=_CONFIG_HELP)
    return common


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def _timeout_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=60.0, metavar="S", help=_READ_TIMEOUT)


def build_parser() -> argparse.ArgumentParser:
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
    _dev_parser(sub, common)
    show = sub.add_parser(
        "show", parents=[common], help="print a payment's event stream and its outbox state"
    )
    target = show.add_mutually_exclusive_group(required=True)
    target.add_argument("payment_id", nargs="?", help="the payment id")
    target.add_argument("--booking", metavar="BOOKING_ID", help="find the payment by booking")
    _dead_letters_parser(sub, common)
    _review_parser(sub, common)
    return parser


def _dev_parser(sub: Any, common: argparse.ArgumentParser) -> None:
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


def _command_group(sub: Any, common: argparse.ArgumentParser, name: str, help: str) -> Any:
    """A command whose actions are subcommands (`review list`, `dead-letters redrive`)."""
    group = sub.add_parser(name, parents=[common], help=help)
    return group.add_subparsers(dest="action", required=True, metavar="ACTION")


def _review_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    actions = _command_group(
        sub,
        common,
        "review",
        "payments flagged for manual review: list them, resolve one without SQL",
    )
    listing = actions.add_parser(
        "list", parents=[common], help="every payment flagged for review and not resolved yet"
    )
    _json_option(listing)
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
    actions = _command_group(
        sub, common, "dead-letters", "inspect the dead-letter topic and re-drive parked messages"
    )
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
    _json_option(listing)
    _timeout_option(listing)
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
    _timeout_option(again)
