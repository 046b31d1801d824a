"""Sending outbox rows for the relay: one PRODUCER span per row, acknowledgements awaited
together, and each row's fate logged."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from payment.adapters.kafka.cloudevents import EncodedRecord, encode_outbound
from payment.adapters.kafka.partition_batches import queue_records
from payment.adapters.kafka.topics import Topics
from payment.adapters.observability.log_budget import LogBudget
from payment.adapters.observability.span_attributes import send_attributes, send_span_name
from payment.adapters.observability.span_values import untrusted_attribute
from payment.adapters.observability.telemetry import records_spans, start_span_continuing
from payment.application import failpoints
from payment.application.ports import OutboxRecord, RecordQueue

log = logging.getLogger("payment.adapters.kafka.relay")

# A record the producer (max_request_size) or the topic (max.message.bytes) refuses.
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)


class RowSender:
    """Sends rows of different keys at once; says which the broker acknowledged."""

    def __init__(
        self,
        producer: RecordQueue,
        topics: Topics,
        *,
        source: str,
        ack_timeout: float,
        tracer: Tracer,
        log_budget: LogBudget,
    ) -> None:
        self._producer = producer
        self._topic_for = topics.outbound
        self._source = source
        self._ack_timeout = ack_timeout
        self._tracer = tracer
        # A row's PRODUCER span times its send for an exporter; its record carries the
        # trace context stored with the row, not the span's. When nothing records spans,
        # a row gets one only for its "published" log line (the line's trace ids).
        self._spans_recorded = records_spans(tracer)
        self._budget = log_budget
        # Keys whose row a topic refused as too large: the producer batches a partition's
        # records together, so such a row fails every row batched with it. These are sent
        # alone until they go through, and the others no longer wait on them.
        self._alone: set[str] = set()
        self.failures = 0

    async def send_round(self, rows: Sequence[OutboxRecord]) -> list[bool]:
        """Send one row of each of several keys; which of them were acknowledged.

        Rows of keys a topic refused as too large go last, each alone (see `_alone`).
        """
        sent: dict[int, bool] = {}
        together = [r for r in rows if r.message.key not in self._alone]
        for row, ok in zip(together, await self._send_together(together), strict=True):
            sent[row.position] = ok
        for row in rows:
            if row.message.key in self._alone:
                (sent[row.position],) = await self._send_together([row], alone=True)
        return [sent[row.position] for row in rows]

    async def _send_together(
        self, rows: Sequence[OutboxRecord], *, alone: bool = False
    ) -> list[bool]:
        """Send rows at once; which of them were acknowledged.

        Every row is queued with the producer first (one PRODUCER span each when spans are
        recorded, ended at its acknowledgement; the rows of a partition in one batch,
        `partition_batches`), then the acknowledgements are awaited together, within
        `ack_timeout`: no task or timer per row.
        """
        started: list[tuple[OutboxRecord, Span | None, EncodedRecord] | None] = []
        for row in rows:
            message = row.message
            try:
                record = encode_outbound(message, source=self._source, topic_for=self._topic_for)
            except KeyError:
                log.error("outbox relay: no topic for type %s (row %d)", message.type, row.position)
                started.append(None)
                continue
            except Exception:  # a row that cannot be encoded holds back its key only
                log.exception("outbox relay: cannot encode row %d (%s)", row.position, message.type)
                started.append(None)
                continue
            span = self._send_span(row, record.topic) if self._spans_recorded else None
            failpoints.hit("before_publish")
            started.append((row, span, record))
        # One batch per partition (partition_batches.py); a row alone goes by itself.
        # `ack_timeout` bounds the queueing and the acknowledgements together.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ack_timeout
        queued = await queue_records(
            self._producer,
            [item[2] for item in started if item is not None],
            batched=not alone,
            deadline=deadline,
        )
        acks_in_order = iter(queued)
        sending = [
            None if item is None else (item[0], item[1], item[2].topic, next(acks_in_order))
            for item in started
        ]
        acks = [item[3] for item in sending if item is not None]
        if acks:
            await asyncio.wait(acks, timeout=max(0.0, deadline - loop.time()))
        results: list[bool] = []
        for item in sending:
            if item is None:
                results.append(False)
                continue
            row, span, topic, ack = item
            error: BaseException | None
            if not ack.done():
                ack.cancel()
                error = TimeoutError()
            else:
                error = None if ack.cancelled() else ack.exception()
                if ack.cancelled():
                    error = TimeoutError()
            results.append(self._acknowledged(row, span, topic, error, alone=alone))
        return results

    def _send_span(self, row: OutboxRecord, topic: str) -> Span:
        """The row's PRODUCER span, a child of the trace context stored with it."""
        span = start_span_continuing(
            self._tracer, send_span_name(topic), row.message.trace, kind=SpanKind.PRODUCER
        )
        if span.is_recording():
            span.set_attributes(_send_span_attributes(row, topic))
        return span

    def _acknowledged(
        self,
        row: OutboxRecord,
        span: Span | None,
        topic: str,
        error: BaseException | None,
        *,
        alone: bool,
    ) -> bool:
        """End the row's span and log its fate; True if the broker acknowledged it."""
        message = row.message
        try:
            if error is not None:
                # Whatever the error, only this row's key is held back: the rows of the
                # round that were acknowledged are still marked, and every span ends.
                self.failures += 1
                if span is not None:
                    span.set_status(Status(StatusCode.ERROR, type(error).__name__))
                if isinstance(error, _TOO_LARGE) and not alone:
                    # Maybe only batched with a row that is: it will be sent alone.
                    self._alone.add(message.key)
                    log.warning(
                        "outbox relay: row %d (%s, key %s) was refused in a batch too large"
                        " for its topic; sending it alone",
                        row.position,
                        message.type,
                        message.key,
                    )
                    return False
                if isinstance(error, _TOO_LARGE):
                    # Not an outage: it fails the same way until the limit is raised.
                    log.error(
                        "outbox relay: row %d (%s, key %s) is larger than the producer or the "
                        "topic accepts (%s): it stays unpublished and holds back the later "
                        "events of key %s only; raise the topic's max.message.bytes (and "
                        "the producer's max_request_size) to publish it",
                        row.position,
                        message.type,
                        message.key,
                        type(error).__name__,
                        message.key,
                    )
                    return False
                broker_trouble = isinstance(error, (KafkaError, TimeoutError))
                log.log(
                    logging.WARNING if broker_trouble else logging.ERROR,
                    "outbox relay: send of row %d (%s, key %s) failed: %s",
                    row.position,
                    message.type,
                    message.key,
                    type(error).__name__,
                    exc_info=None if broker_trouble else error,
                )
                return False
            self._alone.discard(message.key)
            if self._budget.allow(f"published {message.type}"):
                if span is None:  # nothing records it: made for the line's trace ids
                    span = self._send_span(row, topic)
                with trace.use_span(span, end_on_exit=False):
                    log.info(
                        "published %s",
                        message.type,
                        extra={
                            "payment_id"
                            if message.subject is not None
                            else "booking_id": message.key,
                            "event_type": message.type,
                            "ce_id": str(message.event_id),
                            "sequence": message.sequence,
                        },
                    )
        finally:
            if span is not None:
                span.end()
        failpoints.hit("after_publish")
        return True


def _send_span_attributes(row: OutboxRecord, topic: str) -> dict[str, str | int]:
    """The attributes of a row's PRODUCER span (only worked out for a span that records)."""
    message = row.message
    event_id = str(message.event_id)
    # A rejection's key is the sender's booking id, unvalidated: bounded and masked.
    key_attribute, key_value = (
        ("payment.id", message.key)
        if message.subject is not None
        else ("payment.booking_id", untrusted_attribute(message.key))
    )
    return {
        **send_attributes(topic, event_id),
        "cloudevents.event_id": event_id,
        "cloudevents.event_type": message.type,
        key_attribute: key_value,
        "payment.outbox.position": row.position,
    }
