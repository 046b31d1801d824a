"""Parking a message on the dead-letter topic, retried until the broker takes it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from opentelemetry import trace

from payment.adapters.observability.metrics import Metrics
from payment.application.ports import DeadLetters
from payment.application.retry import Backoff

log = logging.getLogger(__name__)


class Parking:
    """Parks records: a broker error or an outage is waited out, never a reason to drop one."""

    def __init__(
        self,
        dead_letters: DeadLetters,
        metrics: Metrics,
        is_transient: Callable[[BaseException], bool],
        backoff: Callable[[], Backoff],
    ) -> None:
        self._dead_letters = dead_letters
        self._metrics = metrics
        self._is_transient = is_transient
        self._backoff = backoff

    async def park(self, record: ConsumerRecord[bytes, bytes], reason: str, *, cause: str) -> None:
        backoff = self._backoff()
        while True:
            try:
                await self._dead_letters.publish(record, reason)
                break
            except Exception as exc:
                if not (isinstance(exc, KafkaError) or self._is_transient(exc)):
                    raise
                delay = backoff.next()
                log.warning("consumer: dead-letter publish failed; retrying in %.1fs", delay)
                await asyncio.sleep(delay)
        self._metrics.messages_dead_lettered.add(1, {"topic": record.topic, "cause": cause})
        span = trace.get_current_span()
        span.set_attribute("payment.dead_lettered", cause)
        log.warning(
            "consumer: dead-lettered %s[%d]@%d: %s",
            record.topic,
            record.partition,
            record.offset,
            reason,
            extra={"cause": cause},
        )
