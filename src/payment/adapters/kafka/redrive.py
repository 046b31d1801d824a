"""Dead-letter tooling: read the dead-letter topic, and re-drive parked records exactly once.

A dead letter is the original record (key, value, headers) plus `dlq_*` headers
(contract section 4.5). Re-driving publishes the original record again, without the
`dlq_*` headers, to the topic it came from; the service then consumes it like any other.

Exactly once, after a fix:
* each dead letter is re-driven at most once: a ledger (`payment_dead_letter_redrives`)
  holds a claim on it while the copy is published and records it in the same
  transaction;
* a crash after the broker acknowledged the copy but before the ledger committed leaves
  the dead letter unclaimed, so the next run publishes a second copy: it has the same
  `ce_source` and `ce_id`, and the inbox absorbs whichever copy comes second.

A dead letter whose card numbers were masked when it was parked
(`dlq_card_numbers_masked`) is not the original record: re-driving it would send another
request under the original's `ce_id`, so it is refused; the sender must send it again.

A dead letter may carry card data (one parked before masking, or a form the masking does
not see): nothing here prints a payload unless asked, and then with card numbers and
secrets masked.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from typing import Final, Protocol, cast

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from payment.adapters.kafka.cloudevents import H_ID, H_SOURCE, H_TYPE
from payment.adapters.kafka.dead_letters import (
    DLQ_CARD_NUMBERS_MASKED,
    DLQ_CONSUMER_GROUP,
    DLQ_HEADERS_DROPPED,
    DLQ_KEY_DROPPED,
    DLQ_ORIGINAL_OFFSET,
    DLQ_ORIGINAL_PARTITION,
    DLQ_ORIGINAL_TOPIC,
    DLQ_PREFIX,
    DLQ_REASON,
    DLQ_VALUE_DROPPED,
)
from payment.adapters.kafka.security import KafkaSecurity, client_security
from payment.adapters.kafka.topics import partitions_of
from payment.adapters.observability.logs import redact
from payment.application.ports import RecordSender, RedriveLedger

_SHOWN_CHARS: Final = 120
_UNPRINTABLE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

Header = tuple[str, bytes | None]


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """One record of the dead-letter topic."""

    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...]

    @property
    def ref(self) -> str:
        """How an operator names it: `PARTITION:OFFSET` on the dead-letter topic."""
        return f"{self.partition}:{self.offset}"

    def header(self, name: str) -> str | None:
        """The last value of a header (case-insensitive), decoded leniently."""
        wanted = name.lower()
        found: str | None = None
        for key, raw in self.headers:
            if key.lower() == wanted and raw is not None:
                found = raw.decode("utf-8", "replace")
        return found

    @property
    def reason(self) -> str | None:
        return self.header(DLQ_REASON)

    @property
    def original_topic(self) -> str | None:
        return self.header(DLQ_ORIGINAL_TOPIC)

    @property
    def original_partition(self) -> int | None:
        return _int(self.header(DLQ_ORIGINAL_PARTITION))

    @property
    def original_offset(self) -> int | None:
        return _int(self.header(DLQ_ORIGINAL_OFFSET))

    @property
    def consumer_group(self) -> str | None:
        return self.header(DLQ_CONSUMER_GROUP)

    @property
    def complete(self) -> bool:
        """False if the record was too large to park whole (a part of it left out)."""
        dropped = (DLQ_VALUE_DROPPED, DLQ_HEADERS_DROPPED, DLQ_KEY_DROPPED)
        return all(self.header(name) is None for name in dropped)

    @property
    def card_numbers_masked(self) -> str | None:
        """The parts (`value,key,headers`) whose card numbers were masked when parked, or
        None if it holds the original bytes."""
        return self.header(DLQ_CARD_NUMBERS_MASKED)

    @property
    def size(self) -> int:
        """Bytes of the value (the payload)."""
        return 0 if self.value is None else len(self.value)

    @property
    def original_headers(self) -> list[Header]:
        """The headers the record had when it was consumed: everything but `dlq_*`."""
        return [(k, v) for k, v in self.headers if not k.lower().startswith(DLQ_PREFIX)]

    def summary(self, *, redriven: str | None = None) -> dict[str, object]:
        """Printable facts about it, safe to show: no payload, untrusted text masked."""
        return {
            "ref": self.ref,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp_ms": self.timestamp_ms,
            "original_topic": shown(self.original_topic),
            "original_partition": self.original_partition,
            "original_offset": self.original_offset,
            "consumer_group": shown(self.consumer_group),
            "reason": shown(self.reason, limit=500),
            "ce_type": shown(self.header(H_TYPE)),
            "ce_source": shown(self.header(H_SOURCE)),
            "ce_id": shown(self.header(H_ID)),
            "key": shown(None if self.key is None else self.key.decode("utf-8", "replace")),
            "size": self.size,
            "value_dropped": _int(self.header(DLQ_VALUE_DROPPED)),
            "card_numbers_masked": shown(self.card_numbers_masked),
            "redriven": redriven,
        }

    def payload(self, limit: int = 4096) -> str:
        """The value as text, card numbers and secrets masked, at most `limit` characters."""
        if self.value is None:
            return "(no value)"
        return shown(self.value.decode("utf-8", "replace"), limit=limit) or ""


def shown(text: str | None, *, limit: int = _SHOWN_CHARS) -> str | None:
    """Untrusted text made safe for a terminal line: control characters escaped, card
    numbers and secrets masked, at most `limit` characters."""
    if text is None:
        return None
    cut = text if len(text) <= limit else text[: limit - 1] + "…"
    escaped = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", cut)
    return redact(escaped)


def _int(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


async def read_dead_letters(
    bootstrap_servers: str,
    topic: str,
    *,
    timeout_s: float = 60.0,
    fetch_max_wait_ms: int = 50,
    security: KafkaSecurity | None = None,
) -> list[DeadLetter]:
    """Every record on `topic` from the beginning up to its end as of now.

    A throwaway consumer (no group, nothing committed) reads it; `TimeoutError` if that
    takes longer than `timeout_s`. An absent topic has no dead letters.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=fetch_max_wait_ms,
        client_id="payment-service-dead-letters",
        **client_security(security),
    )
    try:
        await consumer.start()
    except BaseException:
        await consumer.stop()  # a consumer that failed to start is still open
        raise
    try:
        async with asyncio.timeout(timeout_s):
            partitions = await partitions_of(bootstrap_servers, topic, security)
            return [dl async for dl in _read_to_end(consumer, topic, partitions)]
    finally:
        await consumer.stop()


async def _read_to_end(
    consumer: AIOKafkaConsumer, topic: str, partitions: list[int]
) -> AsyncIterator[DeadLetter]:
    if not partitions:
        return
    tps = [TopicPartition(topic, p) for p in partitions]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
    remaining = set(tps)
    while remaining:
        for tp in list(remaining):
            if await consumer.position(tp) >= ends[tp]:
                remaining.discard(tp)
        if not remaining:
            break
        batch = await consumer.getmany(*remaining, timeout_ms=200)
        for tp, records in batch.items():
            for record in records:
                if record.offset >= ends[tp]:
                    continue
                yield DeadLetter(
                    partition=record.partition,
                    offset=record.offset,
                    timestamp_ms=record.timestamp,
                    key=record.key,
                    value=record.value,
                    headers=tuple(record.headers or ()),
                )


# -- re-driving ----------------------------------------------------------------------------


class RedriveResult(msgspec.Struct, frozen=True, kw_only=True):
    """What happened to one dead letter asked for."""

    ref: str
    outcome: str  # redriven | already_redriven | not_found | refused | dry_run
    detail: str = ""


class _Sent(Protocol):
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...


async def redrive(
    dead_letters: Sequence[DeadLetter],
    wanted: Iterable[str] | None,
    *,
    dlq_topic: str,
    allowed_topics: Collection[str],
    ledger: RedriveLedger,
    producer: RecordSender,
    already: Collection[tuple[int, int]] = (),
    dry_run: bool = False,
) -> list[RedriveResult]:
    """Re-publish the original record of each wanted dead letter (`PARTITION:OFFSET`
    refs; None: all of them), each at most once.

    A dead letter is only sent back to one of `allowed_topics` (the topics the service
    consumes); one from elsewhere is refused, and so is one that is not the original
    record (parked too large to be whole, or with card numbers masked). `already` lists
    dead letters known to be re-driven (they are skipped without a claim; the claim
    still guards against a concurrent run).
    """
    by_ref = {dl.ref: dl for dl in dead_letters}
    refs = list(by_ref) if wanted is None else list(dict.fromkeys(wanted))
    results: list[RedriveResult] = []
    for ref in refs:
        dl = by_ref.get(ref)
        if dl is None:
            results.append(RedriveResult(ref=ref, outcome="not_found"))
            continue
        if (dl.partition, dl.offset) in already:
            results.append(RedriveResult(ref=ref, outcome="already_redriven"))
            continue
        target = dl.original_topic
        if target is None or target not in allowed_topics:
            results.append(
                RedriveResult(
                    ref=ref,
                    outcome="refused",
                    detail=f"original topic {shown(target)!s} is not consumed by this service",
                )
            )
            continue
        if not dl.complete:
            results.append(
                RedriveResult(
                    ref=ref,
                    outcome="refused",
                    detail="too large to be parked whole: the original record is not here",
                )
            )
            continue
        if (masked := dl.card_numbers_masked) is not None:
            results.append(
                RedriveResult(
                    ref=ref,
                    outcome="refused",
                    detail=(
                        f"card numbers masked in its {shown(masked)} when parked: the original"
                        " record is not here; the sender must send it again"
                    ),
                )
            )
            continue
        if dry_run:
            results.append(RedriveResult(ref=ref, outcome="dry_run", detail=f"to {target}"))
            continue
        async with ledger.claim(
            dlq_topic,
            dl.partition,
            dl.offset,
            original_topic=target,
            original_partition=dl.original_partition,
            original_offset=dl.original_offset,
        ) as claim:
            if claim is None:
                results.append(RedriveResult(ref=ref, outcome="already_redriven"))
                continue
            meta = cast(
                _Sent,
                await producer.send_and_wait(
                    target, value=dl.value, key=dl.key, headers=dl.original_headers
                ),
            )
            await claim.done(meta.partition, meta.offset)
        results.append(
            RedriveResult(
                ref=ref, outcome="redriven", detail=f"to {target}[{meta.partition}]@{meta.offset}"
            )
        )
    return results
