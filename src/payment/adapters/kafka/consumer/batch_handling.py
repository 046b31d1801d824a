"""Handling records of one topic fetched together as one batch (application/batches.py):
a few statements in one transaction for the batch instead of a few per message."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TypeVar

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from opentelemetry import trace
from opentelemetry.trace import Span

from payment.adapters.kafka.cloudevents import InboundEvent, PoisonMessage
from payment.adapters.kafka.consumer.handling import MessageHandler
from payment.adapters.kafka.consumer.routing import (
    Route,
    decode,
    execute_command,
    received_trace,
    request_command,
    tag_event,
    trace_of,
)
from payment.adapters.observability.span_values import untrusted_attribute
from payment.application.batches import execute_payments, request_payments
from payment.application.commands import ExecutePayment, RequestPayment, TraceHeaders
from payment.application.errors import PaymentConflict
from payment.application.handlers import ExecuteResult, RequestResult

log = logging.getLogger(__name__)

Fetched = tuple[TopicPartition, ConsumerRecord[bytes, bytes]]
Decoded = list[tuple[ConsumerRecord[bytes, bytes], InboundEvent, Span]]
Command = TypeVar("Command", RequestPayment, ExecutePayment)


class BatchHandler:
    """Records of one topic together; anything unusual goes one by one.

    Records that do not decode, and every record of a batch whose handler raised (an
    outage, a bug), take the single-message path with its retries and dead letters.
    """

    def __init__(self, single: MessageHandler) -> None:
        self._single = single
        self.h = single.h

    async def handle(self, chunk: list[Fetched]) -> None:
        topic = chunk[0][1].topic
        try:
            route = self.h.topics.route(topic)
        except PoisonMessage:
            route = None
        if route not in (Route.REQUEST, Route.INITIATED):
            for _, record in sorted(chunk, key=lambda f: (f[1].partition, f[1].offset)):
                await self._single.handle(record)
            return
        counted = route is Route.REQUEST
        if counted:
            self.h.metrics.requests_received.add(len(chunk))
        decoded: Decoded = []
        alone: list[ConsumerRecord[bytes, bytes]] = []
        for _, record in chunk:
            try:
                event = decode(record, route)
            except PoisonMessage:
                alone.append(record)
                continue
            span = self._single.span(record, received_trace(event))
            tag_event(span, event)
            decoded.append((record, event, span))
        # The batch handlers take records whose body does not decode out of `decoded` and
        # return them for one by one handling: if the batch fails, they are among these.
        batched = [record for record, _, _ in decoded]
        try:
            if counted:
                alone += await self._requests(decoded)
            else:
                alone += await self._executions(decoded)
        except asyncio.CancelledError:
            for _, _, span in decoded:
                span.set_attribute("error.type", "cancelled")
                span.end()
            raise
        except Exception as exc:  # the batch's outermost handler: one by one instead
            log.warning(
                "consumer: batch of %d on %s failed (%s); handling them one by one",
                len(batched),
                topic,
                type(exc).__name__,
            )
            for _, _, span in decoded:
                span.set_attribute("payment.batch.fallback", type(exc).__name__)
                span.end()
            alone += batched
        else:
            for _, _, span in decoded:
                span.end()
        for record in sorted(alone, key=lambda r: (r.partition, r.offset)):
            await self._single.handle(record, counted=counted)

    async def _requests(self, decoded: Decoded) -> list[ConsumerRecord[bytes, bytes]]:
        """Requests through `request_payments`; the records left for one by one handling."""
        cmds, alone = _commands(decoded, request_command)
        for (_, _, span), cmd in zip(decoded, cmds, strict=True):
            if span.is_recording():
                span.set_attribute("payment.booking_id", untrusted_attribute(cmd.booking_id))
        results = await request_payments(
            cmds, self.h.uow_factory, self.h.clock, self.h.request_policy
        )
        tally: Counter[RequestResult] = Counter()
        for (record, event, span), cmd, result in zip(decoded, cmds, results, strict=True):
            with trace.use_span(span, end_on_exit=False):
                if isinstance(result, PaymentConflict):
                    await self._single.conflict(record, cmd.inbound, result, span)
                else:
                    self._single.requested(event, cmd.booking_id, result, span, tally)
        # Counters once per result of the batch, not once per message.
        for result, count in tally.items():
            self._single.count_requests(result, count)
        return alone

    async def _executions(self, decoded: Decoded) -> list[ConsumerRecord[bytes, bytes]]:
        """Executions through `execute_payments`; the records left for one by one handling."""
        cmds, alone = _commands(decoded, execute_command)
        spans: dict[int, Span] = {}  # by id() of the command
        for (_, _, span), cmd in zip(decoded, cmds, strict=True):
            if span.is_recording():
                span.set_attribute("payment.id", str(cmd.payment_id))
            spans[id(cmd)] = span

        def scope(cmd: ExecutePayment) -> AbstractContextManager[object]:
            # The gateway call is traced under its own message's span.
            return trace.use_span(spans[id(cmd)], end_on_exit=False)

        started = time.perf_counter()
        results = await execute_payments(
            cmds, self.h.uow_factory, self.h.processor, self.h.clock, self.h.policy, scope
        )
        elapsed = time.perf_counter() - started
        tally: Counter[ExecuteResult] = Counter()
        for (_, event, span), cmd, result in zip(decoded, cmds, results, strict=True):
            self._single.executed(event, cmd.payment_id, result, span, elapsed, tally)
        for result, count in tally.items():
            self.h.metrics.executions.add(count, {"result": result.value})
        return alone


def _commands(
    decoded: Decoded, build: Callable[[InboundEvent, TraceHeaders], Command]
) -> tuple[list[Command], list[ConsumerRecord[bytes, bytes]]]:
    """The command of each decoded record, and the records whose body does not decode.

    Those are taken out of `decoded` (their spans ended) for one by one handling, so
    `decoded` and the commands line up.
    """
    cmds: list[Command] = []
    kept: Decoded = []
    alone: list[ConsumerRecord[bytes, bytes]] = []
    for record, event, span in decoded:
        try:
            cmds.append(build(event, trace_of(span, event)))
        except PoisonMessage:
            span.end()
            alone.append(record)
            continue
        kept.append((record, event, span))
    decoded[:] = kept
    return cmds, alone
