"""The `payment-service` command: migrate, run, dev, demo, show, dead-letters, review.

One module per command group; each imports what it needs when it runs, so that `--help`
and `--version` stay quick and `dev` and `demo` alone load the dev tooling.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence

from payment.cli.failure import dependency_failure, fail
from payment.cli.parser import build_parser
from payment.settings import (
    EXIT_CONFIGURATION,
    EXIT_UNAVAILABLE,
    ConfigError,
    DependencyUnavailable,
    Settings,
    load_settings,
)

# The parser, under the name the tests and tools have known it by.
_parser = build_parser

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings: Settings | None = None
    try:
        settings = load_settings(config_file=args.config)
        return _dispatch(args, settings)
    except ConfigError as exc:
        return fail("configuration error", str(exc), EXIT_CONFIGURATION, exc, settings)
    except DependencyUnavailable as exc:
        return fail("dependency unavailable", str(exc), EXIT_UNAVAILABLE, exc, settings)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the outermost loop: a dependency's error becomes one line
        line = dependency_failure(exc, settings)
        if line is None:
            raise
        return fail("dependency unavailable", line, EXIT_UNAVAILABLE, exc, settings)


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command not in ("run", "dev") and settings.log_level.upper() != "DEBUG":
        # The operator tools answer in their own words; the Kafka client's retries and
        # connection errors would only repeat the one line a failure ends with.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    if args.command == "migrate":
        from payment.cli import schema

        return asyncio.run(schema.check(settings) if args.check else schema.migrate(settings))
    if args.command in ("run", "dev", "demo"):
        from payment.cli import running

        return running.command(settings, args)
    if args.command in ("show", "review"):
        from payment.cli import payments

        return asyncio.run(payments.command(settings, args))
    if args.command == "dead-letters":
        from payment.cli import dead_letters

        return asyncio.run(dead_letters.command(settings, args))
    return EXIT_CONFIGURATION
