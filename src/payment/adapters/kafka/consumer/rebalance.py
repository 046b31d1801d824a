"""Rebalancing: partitions leave only after their in-flight work is drained and committed."""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any, Protocol

from aiokafka import ConsumerRebalanceListener, TopicPartition

log = logging.getLogger(__name__)


class Member(Protocol):
    """What the rebalance listener needs of the consumer it serves."""

    def release(self, revoked: set[TopicPartition]) -> None:
        """Dispatch nothing more of `revoked` and drop what is held of them."""
        ...

    async def drain(self, partitions: Collection[TopicPartition]) -> None: ...

    async def commit(self, only: Collection[TopicPartition]) -> None: ...

    def forget(self, partitions: set[TopicPartition]) -> None: ...

    def acquire(self, assigned: set[TopicPartition]) -> None: ...


class Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, member: Member) -> None:
        self._member = member

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.revoke(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.assign(set(assigned))

    async def revoke(self, revoked: set[TopicPartition]) -> None:
        member = self._member
        # First, so that the run loop dispatches nothing more from these partitions. Held
        # requests of these partitions are the next owner's (it re-reads them from the
        # last commit): dispatched here later, they could move a re-assigned partition's
        # offset past records not read again yet.
        member.release(revoked)
        await member.drain(revoked)
        await member.commit(revoked)
        member.forget(revoked)
        if revoked:
            log.info("consumer: partitions revoked: %s", names(revoked))

    async def assign(self, assigned: set[TopicPartition]) -> None:
        self._member.acquire(assigned)
        if assigned:
            log.info("consumer: partitions assigned: %s", names(assigned))


def names(tps: set[TopicPartition]) -> str:
    return ", ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in tps))
