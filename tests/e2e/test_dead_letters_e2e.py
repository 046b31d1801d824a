"""`payment-service dead-letters list | redrive` against the real broker and `run` process.

After a fix, each parked message is processed exactly once: re-driving twice does nothing
the second time (the ledger), and a second copy that slips through (a crash between the
broker's acknowledgement and the ledger's commit) is absorbed by the inbox. A dead letter
whose card numbers were masked when it was parked is not the original: it is refused.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
import pytest

from payment.adapters.kafka.dead_letters import KafkaDeadLetterPublisher
from payment.adapters.kafka.producer import create_producer

from .harness import (
    EventLog,
    Received,
    ServiceStack,
    StackFactory,
    broker_supports_idempotence,
    request_data,
    run_cli,
)

pytestmark = pytest.mark.timeout(240)

CARD_SPACED = "4242 4242 4242 4242"


@dataclass(frozen=True)
class ParkedRecord:
    """A consumed record as the dead-letter publisher reads it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]]


async def cli(stack: ServiceStack, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_cli, "dead-letters", *args, env=stack.env())


async def listed(stack: ServiceStack, *extra: str) -> dict[str, dict[str, object]]:
    done = await cli(stack, "list", "--json", *extra)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return {str(row["ref"]): row for row in rows}


def ref(record: Received) -> str:
    return f"{record.partition}:{record.offset}"


def distinct_terminal(log: EventLog, booking: str) -> int:
    return len(EventLog.distinct(log.terminal(booking)))


async def test_list_then_redrive_processes_each_parked_message_exactly_once(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    orch = stack.orch

    # 1. A valid request parked for a reason since fixed (a handler bug, say): the service
    #    never processed it. Published the way the consumer parks records.
    fixed = f"dl-fixed-{uuid.uuid4().hex[:8]}"
    body = request_data(fixed, payment_method="pm_token_only_in_the_payload")
    producer = create_producer(stack.bootstrap, enable_idempotence=broker_supports_idempotence())
    await producer.start()
    try:
        await KafkaDeadLetterPublisher(producer, stack.topics.dead_letter, stack.group).publish(
            ParkedRecord(
                topic=stack.topics.request,
                partition=0,
                offset=987_654,
                key=fixed.encode(),
                value=json.dumps(body).encode(),
                headers=orch.headers(),
            ),
            "handler error: SimulatedBug",
        )
    finally:
        await producer.stop()
    parked_fixed = await orch.wait_for(
        lambda log: next(iter(log.dead_letters(fixed)), None), what="the simulated dead letter"
    )

    # 2. A conflicting re-request (another amount): parked by the service, inbox marked.
    conflicting = f"dl-conflict-{uuid.uuid4().hex[:8]}"
    await orch.request(conflicting, amount=1000)
    assert (await orch.wait_outcome(conflicting)).kind == "completed"
    second = await orch.request(conflicting, amount=2000)
    parked_conflict = await orch.wait_dead_letter(second)

    # 3. Poison that no fix will cure: not JSON.
    poison = await orch.send_raw(b"not json", key=b"dl-poison", headers=orch.headers())
    parked_poison = await orch.wait_dead_letter(poison)

    # 4. Poison with a card number in it: parked masked (contract section 3), never re-driven.
    carded = await orch.send_raw(
        f"not json {CARD_SPACED}".encode(), key=b"dl-card", headers=orch.headers()
    )
    parked_card = await orch.wait_dead_letter(carded)
    assert parked_card.value == b"not json [REDACTED CARD]"
    assert parked_card.header("dlq_card_numbers_masked") == "value"

    # -- list ------------------------------------------------------------------------------
    rows = await listed(stack)
    assert set(rows) == {
        ref(parked_fixed),
        ref(parked_conflict),
        ref(parked_poison),
        ref(parked_card),
    }
    row = rows[ref(parked_fixed)]
    assert row["reason"] == "handler error: SimulatedBug"
    assert (row["original_topic"], row["original_partition"], row["original_offset"]) == (
        stack.topics.request,
        0,
        987_654,
    )
    assert row["ce_type"] == "saga.request_payment"
    assert row["ce_id"] == parked_fixed.ce_id
    assert row["size"] == len(parked_fixed.value or b"")
    assert row["redriven"] == "parked"
    assert str(rows[ref(parked_conflict)]["reason"]).startswith("conflict:")
    assert rows[ref(parked_poison)]["original_offset"] == poison.offset
    assert rows[ref(parked_card)]["card_numbers_masked"] == "value"

    text = await cli(stack, "list")
    assert text.returncode == 0, text.stderr
    assert "4 dead letters, 0 re-driven" in text.stdout
    assert "pm_token_only_in_the_payload" not in text.stdout, "payloads are never shown"
    assert "not json" not in text.stdout
    shown = await cli(stack, "list", "--show-payload")
    assert "pm_token_only_in_the_payload" in shown.stdout
    assert "not json" in shown.stdout
    assert CARD_SPACED not in shown.stdout and "4242424242424242" not in shown.stdout
    assert "[REDACTED CARD]" in shown.stdout

    # -- redrive one -----------------------------------------------------------------------
    done = await cli(stack, "redrive", ref(parked_fixed))
    assert done.returncode == 0, done.stderr + done.stdout
    assert f"{ref(parked_fixed)}: redriven (to {stack.topics.request}[" in done.stdout
    outcome = await orch.wait_outcome(fixed)
    assert outcome.kind == "completed"
    await orch.settle()
    assert len(orch.events.initiated(fixed)) == 1
    assert distinct_terminal(orch.events, fixed) == 1

    # Again: the ledger says it was done; nothing is published.
    again = await cli(stack, "redrive", ref(parked_fixed))
    assert again.returncode == 0
    assert f"{ref(parked_fixed)}: already redriven" in again.stdout
    rows = await listed(stack)
    assert str(rows[ref(parked_fixed)]["redriven"]).startswith("redriven:")

    # -- redrive all -----------------------------------------------------------------------
    everything = await cli(stack, "redrive", "--all")
    assert everything.returncode == 1, everything.stderr + everything.stdout
    assert f"{ref(parked_card)}: refused (card numbers masked in its value" in everything.stdout
    assert f"{ref(parked_fixed)}: already redriven" in everything.stdout
    assert f"{ref(parked_conflict)}: redriven" in everything.stdout
    assert f"{ref(parked_poison)}: redriven" in everything.stdout
    # The still-broken poison parks again, as a new dead letter of its re-driven copy.
    reparked = await orch.wait_for(
        lambda log: next(
            (
                r
                for r in log.dead_letters("dl-poison")
                if r.offset != parked_poison.offset or r.partition != parked_poison.partition
            ),
            None,
        ),
        what="the re-driven poison parked again",
    )
    assert reparked.value == parked_poison.value
    await orch.settle()
    # The conflicting re-request was handled when it was parked (its inbox mark): its copy
    # changes nothing: no new outcome, no new dead letter.
    assert len(orch.events.dead_letters(conflicting)) == 1
    assert len(orch.events.terminal(conflicting)) == 1
    assert len(orch.events.initiated(conflicting)) == 1

    # A third run re-drives none of the three.
    third = await cli(stack, "redrive", ref(parked_fixed), ref(parked_conflict), ref(parked_poison))
    assert third.returncode == 0
    assert third.stdout.count("already redriven") == 3, third.stdout
    assert "0 re-driven" in third.stdout

    # -- the crash window ------------------------------------------------------------------
    # A crash after the broker acknowledged the copy but before the ledger committed leaves
    # no ledger row: the next run publishes a second copy, and the inbox absorbs it.
    with psycopg.connect(stack.database_url) as conn:
        conn.execute(
            "DELETE FROM payment_dead_letter_redrives WHERE dlq_partition = %s AND dlq_offset = %s",
            (parked_fixed.partition, parked_fixed.offset),
        )
    copy = await cli(stack, "redrive", ref(parked_fixed))
    assert f"{ref(parked_fixed)}: redriven" in copy.stdout
    await orch.settle()
    assert len(orch.events.initiated(fixed)) == 1
    assert distinct_terminal(orch.events, fixed) == 1
    assert len(orch.events.terminal(fixed)) == 1, "a duplicate changes nothing, publishes nothing"
    assert not orch.events.dead_letters(fixed)[1:], "the copy was not parked either"


async def test_redrive_refuses_bad_refs_and_foreign_topics(make_stack: StackFactory) -> None:
    stack = await make_stack()
    producer = create_producer(stack.bootstrap, enable_idempotence=broker_supports_idempotence())
    await producer.start()
    try:
        await KafkaDeadLetterPublisher(producer, stack.topics.dead_letter, stack.group).publish(
            ParkedRecord(
                topic="somebody.elses.topic",
                partition=0,
                offset=1,
                key=b"k",
                value=b"{}",
                headers=[],
            ),
            "poison",
        )
    finally:
        await producer.stop()
    foreign = await stack.orch.wait_for(
        lambda log: next(iter(log.dead_letters("k")), None), what="the foreign dead letter"
    )
    refused = await cli(stack, "redrive", ref(foreign), "7:12345")
    assert refused.returncode == 1
    assert f"{ref(foreign)}: refused" in refused.stdout
    assert "7:12345: not found" in refused.stdout
    usage = await cli(stack, "redrive")
    assert usage.returncode == 2
    both = await cli(stack, "redrive", "--all", "0:1")
    assert both.returncode == 2
    malformed = await cli(stack, "redrive", "12")
    assert malformed.returncode == 2
