"""A burst of requests at the door: memory stays bounded, the executor keeps going, and
readiness says there is a backlog until it is worked off.

100,000 requests are produced as fast as the broker takes them (a few seconds), against
one `payment-service run` with its defaults. While they are handled the test samples the
service's resident memory, its `/health/ready` and the payments table (accepted and
completed). Figures are printed (peak RSS from the kernel's VmHWM, throughput); the
assertions are about behaviour: every request ends completed, the executor completes
payments while requests are still arriving, readiness answers 503 (backlog) during the
burst and 200 after, and the peak RSS stays under a bound far below what holding the
burst in memory would take.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import pytest
from aiokafka import AIOKafkaProducer

from .harness import ServiceStack, StackFactory, broker_supports_idempotence

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

BURST = 100_000
# Holding the burst (or its tasks) in memory would take several hundred MiB; the service
# needs well under 100 MiB when it is not buffering (README, "Status").
PEAK_RSS_BOUND_MIB = 300


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


async def _produce(stack: ServiceStack, run: str) -> float:
    producer = AIOKafkaProducer(
        bootstrap_servers=stack.bootstrap,
        acks="all",
        enable_idempotence=broker_supports_idempotence(),
        linger_ms=20,
        max_batch_size=256 * 1024,
    )
    await producer.start()
    started = time.monotonic()
    try:
        acks = []
        for n in range(BURST):
            booking = f"burst-{run}-{n}"
            value = json.dumps(
                {
                    "booking_id": booking,
                    "amount": 1000,
                    "currency": "EUR",
                    "payment_method": "pm_card_visa",
                    "saga_id": f"saga-{booking}",
                }
            ).encode()
            headers = [
                ("ce_specversion", b"1.0"),
                ("ce_id", str(uuid.uuid4()).encode()),
                ("ce_source", b"burst-orchestrator"),
                ("ce_type", b"saga.request_payment"),
                ("ce_time", datetime.now(UTC).isoformat().replace("+00:00", "Z").encode()),
                ("content-type", b"application/json"),
            ]
            acks.append(
                await producer.send(
                    stack.topics.request, value=value, key=booking.encode(), headers=headers
                )
            )
        await asyncio.gather(*acks)
    finally:
        await producer.stop()
    return time.monotonic() - started


async def _counts(database_url: str) -> tuple[int, int]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE status = 'COMPLETED') FROM payment_payments"
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def test_a_burst_of_requests_is_worked_off_with_bounded_memory(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    service = stack.service
    pid = service.pid
    assert pid is not None
    run = uuid.uuid4().hex[:6]
    rss_before = _kib(pid, "VmRSS")

    producing = asyncio.create_task(_produce(stack, run))
    samples: list[tuple[float, int, int, int, int]] = []  # t, accepted, completed, ready, rss
    started = time.monotonic()
    produced_in: float | None = None
    async with httpx.AsyncClient(base_url=service.base_url, timeout=5.0) as client:
        while True:
            accepted, completed = await _counts(stack.database_url)
            try:
                ready = (await client.get("/health/ready")).status_code
            except httpx.TransportError:
                ready = 0
            # A service that died (by a signal, say) has no memory to read: say so.
            assert service.running, f"the service exited with {service.returncode} in the burst"
            samples.append(
                (time.monotonic() - started, accepted, completed, ready, _kib(pid, "VmRSS"))
            )
            if produced_in is None and producing.done():
                produced_in = producing.result()
            if completed == BURST:
                break
            assert time.monotonic() - started < 1200, f"stuck: {samples[-5:]}"
            await asyncio.sleep(1.0)
        elapsed = time.monotonic() - started
        # The last outcomes may still be in the outbox: ready once they are published.
        ready_after = 0
        while time.monotonic() - started < elapsed + 120:
            ready_after = (await client.get("/health/ready")).status_code
            if ready_after == 200:
                break
            await asyncio.sleep(1.0)
    peak_kib = _kib(pid, "VmHWM")

    print(
        f"\nburst of {BURST}: produced in {produced_in or 0:.1f}s, all completed in "
        f"{elapsed:.1f}s ({BURST / elapsed:.0f} payments/s); RSS before {rss_before / 1024:.0f} "
        f"MiB, peak RSS {peak_kib / 1024:.0f} MiB; ready again "
        f"{time.monotonic() - started - elapsed:.1f}s later"
    )
    for t, accepted, completed, ready, rss in samples[:: max(1, len(samples) // 20)]:
        print(
            f"  t={t:6.1f}s accepted={accepted:6d} completed={completed:6d} "
            f"ready={ready} rss={rss / 1024:.0f}MiB"
        )

    # The executor kept going while requests were still being accepted.
    assert any(completed > 0 and accepted < BURST for _, accepted, completed, *_ in samples)
    # Readiness said there was a backlog while the burst was worked off, and is back
    # once it is gone.
    busy = [ready for _, accepted, completed, ready, _ in samples if completed < BURST - 10_000]
    assert busy.count(503) >= len(busy) * 0.8, busy
    assert ready_after == 200
    assert peak_kib / 1024 < PEAK_RSS_BOUND_MIB
