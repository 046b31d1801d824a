"""Offsets: what each partition may commit, and committing it only as a group member."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from payment.application import failpoints

log = logging.getLogger(__name__)


class PartitionProgress:
    """Offsets of one partition: which are still being handled, and what may be committed.

    Messages finish out of order (a slow gateway call beside fast ones); the committed
    offset never passes the lowest message not yet finished, so a crash redelivers at
    most the unfinished ones (and the inbox absorbs the finished ones among them).
    """

    def __init__(self) -> None:
        self.unfinished: set[int] = set()
        self.highest = -1
        self.committed = -1

    def start(self, offset: int) -> None:
        self.unfinished.add(offset)
        self.highest = max(self.highest, offset)

    def finish(self, offset: int) -> None:
        self.unfinished.discard(offset)

    def committable(self) -> int | None:
        """The next offset to consume, if it moved since the last commit."""
        nxt = min(self.unfinished) if self.unfinished else self.highest + 1
        return nxt if nxt > self.committed and nxt > 0 else None


class Offsets:
    """The progress of every partition this member handles, and their commits."""

    def __init__(self, commit_timeout_s: float) -> None:
        self.progress: dict[TopicPartition, PartitionProgress] = {}
        self._timeout_s = commit_timeout_s
        self._lock = asyncio.Lock()

    def of(self, tp: TopicPartition) -> PartitionProgress:
        return self.progress.setdefault(tp, PartitionProgress())

    def forget(self, tp: TopicPartition) -> None:
        self.progress.pop(tp, None)

    async def commit(
        self, consumer: AIOKafkaConsumer, partitions: Collection[TopicPartition]
    ) -> None:
        """Commit what `partitions` may commit; a failure is logged and retried later.

        After a rebalance the new owner re-reads from the last commit; the inbox absorbs
        what we already handled.
        """
        async with self._lock:
            offsets: dict[TopicPartition, int] = {}
            for tp, progress in self.progress.items():
                nxt = progress.committable() if tp in partitions else None
                if nxt is not None:
                    offsets[tp] = nxt
            if not offsets:
                return
            try:
                failpoints.hit("before_offset_commit")
                committed = await commit_as_member(consumer, offsets, self._timeout_s)
            except (CommitFailedError, KafkaError, TimeoutError) as exc:
                log.warning("consumer: offset commit failed (%s); will retry", type(exc).__name__)
                return
            if not committed:
                log.info("consumer: not a member of the group now; offsets left uncommitted")
                return
            failpoints.hit("after_offset_commit")
            for tp, nxt in offsets.items():
                self.progress[tp].committed = nxt


async def commit_as_member(
    consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int], timeout_s: float
) -> bool:
    """Commit `offsets` only while this consumer holds a generation of its group.

    A consumer that lost its membership (its session expired while the broker was away,
    or the broker forgot it) has generation -1, and a broker accepts a commit without a
    generation into a group that has no members. Those offsets were read from the log as
    it was before: if the broker lost that log (a broker without durable storage
    restarted, a topic re-created), they point past records nobody has read yet, and the
    group would skip them. So a consumer without a generation does not commit (returns
    False): the partitions' next owner re-reads from the last commit and the inbox absorbs
    the redelivery. The check is made once the coordinator is known, right before the
    request goes out; a commit that waits longer than `timeout_s` (no coordinator
    reachable) gives up with TimeoutError and is retried later, checked again.

    aiokafka keeps the generation private (`_coordinator.generation`); without it this
    falls back to a plain commit.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    async with asyncio.timeout(timeout_s):
        if coordinator is not None:
            await coordinator.ensure_coordinator_known()
            generation = getattr(coordinator, "generation", 0)
            if isinstance(generation, int) and generation < 0:
                return False
        await consumer.commit(offsets)
    return True
