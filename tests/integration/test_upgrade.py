"""Every earlier release's data, as its database held it, works under today's code.

`tests/fixtures/releases/<release>/` holds what one release wrote on each path (dumped by
`tests/fixtures/releases/generate.py` from that release's checkout). Each later release
adds its own directory and none is ever deleted. For each one, this test loads the rows
into a fresh database migrated by the current code, both ways a rolling upgrade meets
them: written before the upgrade's migrations ran (then migrated), and written by the old
release into the already migrated schema. Then, with today's code:

* every stream replays to the state the old release gave it, and the payment index agrees;
* `payment-service show` prints every stream as the old release did;
* every redelivered request is still a duplicate (the inbox), and changes nothing;
* the real relay publishes exactly the unpublished outbox rows to a real broker, with
  their stored `ce_id`, data and the `ce_dataschema` of the version they were written in;
* an old stream takes new events, and replays with them.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord
from psycopg import sql

from fixtures.releases.generate import POLICY, TABLES, Unknowing, state_of
from payment.adapters.kafka.producer import create_producer
from payment.adapters.kafka.relay import KafkaOutboxRelay
from payment.adapters.kafka.topics import Topics, ensure_topics
from payment.adapters.postgres.migrations import apply_migrations, available_migrations
from payment.adapters.postgres.pool import open_pool
from payment.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from payment.application.commands import InboundRef, ReconcilePayment, RequestPayment
from payment.application.handlers import RequestResult, reconcile_payment, request_payment
from payment.cli import main
from payment.domain.payment import Payment, PaymentStatus
from payment.domain.processor import Approved
from support.topics import unique_topics

RELEASES = sorted(
    p.parent for p in (Path(__file__).parents[1] / "fixtures" / "releases").glob("*/paths.json")
)
IDENTITY_TABLES = ("payment_events", "payment_outbox")


class Clock:
    def __init__(self) -> None:
        self.at = datetime(2026, 2, 1, 12, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.at


def rows_of(release: Path, table: str) -> list[dict[str, Any]]:
    with (release / f"{table}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def paths_of(release: Path) -> list[dict[str, Any]]:
    paths: list[dict[str, Any]] = json.loads((release / "paths.json").read_text("utf-8"))
    return paths


async def load_release(url: str, release: Path, *, migrate_first: bool) -> None:
    """The release's rows, inserted as they were stored (positions kept), in a schema at
    the release's migrations and then migrated, or already migrated."""
    written_at = json.loads((release / "schema.json").read_text("utf-8"))
    code = available_migrations()
    # The migrations a release ran are never edited afterwards: the same files today.
    assert [(m["version"], m["checksum"]) for m in written_at] == [
        (m.version, m.checksum) for m in code[: len(written_at)]
    ]
    async with await psycopg.AsyncConnection.connect(url) as conn:
        await apply_migrations(conn, code if migrate_first else code[: len(written_at)])
        async with conn.transaction():
            for table in TABLES:
                for row in rows_of(release, table):
                    columns = sql.SQL(", ").join(map(sql.Identifier, row))
                    await conn.execute(
                        sql.SQL(
                            "INSERT INTO {t} ({c}) OVERRIDING SYSTEM VALUE"
                            " SELECT {c} FROM jsonb_populate_record(NULL::{t}, %s::jsonb)"
                        ).format(t=sql.Identifier(table), c=columns),
                        (json.dumps(row),),
                    )
            for table in IDENTITY_TABLES:
                await conn.execute(
                    sql.SQL(
                        "SELECT setval(pg_get_serial_sequence({t}, 'position'),"
                        " (SELECT coalesce(max(position), 0) + 1 FROM {i}), false)"
                    ).format(t=sql.Literal(table), i=sql.Identifier(table))
                )
        if not migrate_first:
            await apply_migrations(conn, code)


def redelivered(request: dict[str, Any]) -> RequestPayment:
    return RequestPayment(
        inbound=InboundRef(source=request["source"], message_id=request["message_id"]),
        booking_id=request["booking_id"],
        amount=request["amount"],
        currency=request["currency"],
        payment_method=request["payment_method"],
        customer_id=request["customer_id"],
        saga_id=request["saga_id"],
    )


async def read_all(
    bootstrap: str, topics: Topics, count: int
) -> list[ConsumerRecord[bytes, bytes]]:
    consumer = AIOKafkaConsumer(
        *topics.outbound.values(),
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=20,
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        async with asyncio.timeout(30):
            while len(records) < count:
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    records.extend(batch)
        for batch in (await consumer.getmany(timeout_ms=500)).values():
            records.extend(batch)  # anything more is a row published twice
    finally:
        await consumer.stop()
    return records


@pytest_asyncio.fixture
async def topics(kafka_bootstrap: str) -> AsyncIterator[Topics]:
    made = unique_topics("upgrade")
    await ensure_topics(kafka_bootstrap, made.names, partitions=1)
    yield made


def test_there_are_releases_to_check() -> None:
    assert RELEASES, "tests/fixtures/releases/ lost its golden fixtures: none may be deleted"


@pytest.mark.parametrize("migrate_first", [False, True], ids=["then-migrated", "into-migrated"])
@pytest.mark.parametrize("release", RELEASES, ids=[p.name for p in RELEASES])
async def test_a_release_s_data_works_after_the_upgrade(
    release: Path,
    migrate_first: bool,
    database_url: str,
    kafka_bootstrap: str,
    topics: Topics,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await load_release(database_url, release, migrate_first=migrate_first)
    paths = paths_of(release)
    streams = [p for p in paths if p["payment_id"] is not None]
    outbox = rows_of(release, "payment_outbox")
    index = {row["payment_id"]: row for row in rows_of(release, "payment_payments")}
    clock = Clock()

    # `show` prints every stream as the release that wrote it did.
    for path in streams:
        capsys.readouterr()
        monkeypatch.setenv("PAYMENT_DATABASE_URL", database_url)
        assert await asyncio.to_thread(main, ["show", path["payment_id"]]) == 0
        shown = capsys.readouterr().out.splitlines()
        was = path["show"]
        events_part = slice(0, was.index(next(x for x in was if x.startswith("outbox ("))))
        assert shown[events_part] == was[events_part], path["path"]
        assert len(shown) == len(was), path["path"]

    async with open_pool(database_url, min_size=1, max_size=4) as pool:
        uows = PostgresUnitOfWorkFactory(pool)

        # Every stream replays to the same state; the index agrees with it.
        async with uows() as uow:
            loaded = await uow.events.load_many([uuid.UUID(p["payment_id"]) for p in streams])
        for path in streams:
            payment = Payment.replay(loaded[uuid.UUID(path["payment_id"])])
            assert state_of(payment) == path["state"], path["path"]
            assert index[path["payment_id"]]["status"] == path["state"]["status"]

        # A redelivered request is still a duplicate: nothing changes, nothing is queued.
        for path in paths:
            for request in path["requests"]:
                result = await request_payment(redelivered(request), uows, clock)
                assert result is RequestResult.DUPLICATE, (path["path"], request["message_id"])
        async with uows() as uow:
            pending = await uow.outbox.pending(1000)
        unpublished = [row for row in outbox if row["published_at"] is None]
        assert [r.position for r in pending] == [row["position"] for row in unpublished]

        # The real relay publishes exactly those rows, as stored, under their own version.
        producer = create_producer(
            kafka_bootstrap,
            enable_idempotence=os.environ.get("PAYMENT_KAFKA_ENABLE_IDEMPOTENCE", "false").lower()
            in ("1", "true"),
        )
        await producer.start()
        try:
            relay = KafkaOutboxRelay(producer, uows, topics, clock)
            assert await relay.publish_pending() == (len(unpublished), 0)
            assert await relay.publish_pending() == (0, 0)
        finally:
            await producer.stop()
        records = await read_all(kafka_bootstrap, topics, len(unpublished))
        got = sorted(
            (
                dict(record.headers)["ce_id"].decode(),
                dict(record.headers)["ce_dataschema"].decode(),
                record.value,
            )
            for record in records
        )
        assert got == sorted(
            (
                row["event_id"],
                f"urn:payment-service:{row['type']}:{row.get('schema_version', 1)}",
                bytes.fromhex(row["data"].removeprefix("\\x")),
            )
            for row in unpublished
        )

        # An old stream takes today's events and replays with them.
        flagged = [p for p in streams if p["state"]["flagged_for_review"]]
        for path in flagged:
            pid = uuid.UUID(path["payment_id"])
            clock.at += timedelta(hours=1)
            gateway = Unknowing(Approved(provider_reference="late_ref"))
            await reconcile_payment(ReconcilePayment(payment_id=pid), uows, gateway, clock, POLICY)
            async with uows() as uow:
                payment = Payment.replay(await uow.events.load(pid))
            assert payment.status is PaymentStatus.COMPLETED
            assert payment.version == path["state"]["version"] + 2
