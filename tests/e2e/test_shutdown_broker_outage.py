"""SIGTERM while the broker is down (issue 14, item 7): the stop stays within its bound.

The real `run` process on a private one-node Apache Kafka: requests are fetched and being
handled (the fake processor takes seconds per charge) when the broker is killed, so their
outcomes land in the outbox and the relay's sends wait for acknowledgements that never
come. SIGTERM then: the consumer's drain, its offset commit, the relay's flush, its pass
in progress and the producer's close must all fit within the 30 s the README gives an
orchestrator (`terminationGracePeriodSeconds` above it), and the process exits 0. After
the broker and the service are back, every request has its one outcome: nothing that was
abandoned at the stop is lost.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from payment.settings import DRAIN_TIMEOUT_S
from support.broker import is_tansu, private_broker
from support.fixtures import DatabaseFactory
from support.waiting import eventually

from .harness import EventLog, free_port, open_stack

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(420),
    pytest.mark.skipif(is_tansu(), reason="a Tansu restart loses every record"),
]

CHARGE_LATENCY_MS = 3000
REQUESTS = 12


def _unpublished(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM payment_outbox WHERE published_at IS NULL"
        ).fetchone()
    return 0 if row is None else int(row[0])


async def test_sigterm_during_a_broker_outage_stops_within_the_drain_bound(
    make_database: DatabaseFactory,
    e2e_log_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The broker is killed, then started again on the same port with its records.
    with private_broker(port=free_port()) as broker:
        database_url = make_database(prefix="payment_e2e")
        async with open_stack(
            bootstrap=broker.bootstrap_servers,
            database_url=database_url,
            log_dir=e2e_log_dir,
            topic_prefix="stop-outage",
            PAYMENT_FAKE_LATENCY_MS=str(CHARGE_LATENCY_MS),
            PAYMENT_LOG_LEVEL="INFO",
        ) as stack:
            orch, service = stack.orch, stack.service
            await orch.settle(timeout_s=60)
            bookings = [f"stop-{uuid.uuid4().hex[:8]}-{n}" for n in range(REQUESTS)]
            await asyncio.gather(*(orch.request(b) for b in bookings))
            # Fetched, and their charges under way: then the broker goes.
            await eventually(
                lambda: any(orch.events.initiated(b) for b in bookings),
                30,
                every=0.1,
                what="a request fetched and initiated",
            )
            await asyncio.to_thread(broker.kill)
            # The outcomes of the charges in flight wait in the outbox for a broker.
            await eventually(
                lambda: _unpublished(database_url) > 0,
                30,
                every=0.2,
                what="outcomes pending in the outbox",
            )
            await asyncio.sleep(2)  # the relay's pass is waiting for acknowledgements
            pending = _unpublished(database_url)

            stopped = time.monotonic()
            service.send_signal(signal.SIGTERM)
            code = await service.wait_exit(120)
            took = time.monotonic() - stopped
            with capsys.disabled():
                print(
                    f"\nSIGTERM with the broker down ({pending} outbox rows pending):"
                    f" exited {code} after {took:.1f}s"
                )
            assert code == 0, service.log_tail(60)
            assert took <= DRAIN_TIMEOUT_S, (
                f"the stop took {took:.1f}s, more than the {DRAIN_TIMEOUT_S:.0f} s bound"
                " the README gives orchestrators\n" + service.log_tail(60)
            )

            await asyncio.to_thread(broker.start)
            await service.start_ready(timeout_s=120)
            await orch.wait_all_terminal(bookings, timeout_s=180)
            for booking in bookings:
                assert len(EventLog.distinct(orch.events.terminal(booking))) == 1, booking
