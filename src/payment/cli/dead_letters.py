"""`payment-service dead-letters list|redrive`: what the dead-letter topic holds, and
re-publishing parked records to their original topic, each at most once."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from payment.cli.common import checked_kafka_security, require_database
from payment.settings import ConfigError, DependencyUnavailable, Settings

if TYPE_CHECKING:
    from payment.adapters.kafka.redrive import DeadLetter
    from payment.adapters.kafka.security import KafkaSecurity

_REF = re.compile(r"(\d+):(\d+)")


async def command(settings: Settings, args: argparse.Namespace) -> int:
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
        url = require_database(settings)
    security = await checked_kafka_security(settings)
    letters = await read_dead_letters(
        settings.kafka_bootstrap_servers, topic, timeout_s=args.timeout, security=security
    )
    if args.action == "list":
        return await list_letters(settings, letters, args.show_payload, args.json)
    return await redrive(settings, url, letters, None if args.all else refs, args.dry_run, security)


async def list_letters(
    settings: Settings, letters: Sequence[DeadLetter], show_payload: bool, as_json: bool
) -> int:
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


async def redrive(
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
