"""Peer benchmark: the `eventsourcing` library (9.x, PostgreSQL) doing a payment's two changes.

Per payment: create a Payment aggregate and save it (one event), then get it back from
the repository, complete it and save it (a second event) — the same two state changes our
service records per payment, without our inbox, booking index, outbox or broker. The
library is synchronous, so N worker threads run the loop concurrently, each through the
library's own connection pool, on a fresh database of the same server (dropped after).

    .venv/bin/python bench/peer_eventsourcing.py --workers 8 --seconds 10
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import load, scratch_database, server_url, table


@dataclass
class PeerResult:
    workers: int
    seconds: float
    payments: int
    cpu_s: float  # this process: the library and its driver (PostgreSQL's CPU not included)
    load: str
    version: str

    @property
    def rate(self) -> float:
        return self.payments / self.seconds

    def row(self) -> list[str]:
        return [
            f"eventsourcing {self.version}",
            str(self.workers),
            f"{self.seconds:.1f}",
            str(self.payments),
            f"{self.rate:.0f}",
            f"{1000 * self.cpu_s / max(self.payments, 1):.2f}",
            self.load,
        ]


HEADER = ["peer", "workers", "s", "payments", "payments/s", "client CPU ms/pay", "load 1/5/15"]


def run(workers: int, seconds: float, warmup_s: float = 2.0) -> PeerResult:
    # Imported here: the library is an optional (dev) dependency of the bench only.
    from importlib.metadata import version

    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event

    class Payment(Aggregate):
        @event("Initiated")
        def __init__(self, booking_id: str, amount: int, currency: str, method: str) -> None:
            self.booking_id = booking_id
            self.amount = amount
            self.currency = currency
            self.method = method
            self.status = "INITIATED"
            self.reference: str | None = None

        @event("Completed")
        def complete(self, reference: str) -> None:
            self.status = "COMPLETED"
            self.reference = reference

    class Payments(Application[uuid.UUID]):
        def initiate(self, booking_id: str) -> uuid.UUID:
            payment = Payment(booking_id, 1999, "EUR", "pm_card_visa")
            self.save(payment)
            return payment.id

        def complete(self, payment_id: uuid.UUID) -> None:
            payment: Payment = self.repository.get(payment_id)
            payment.complete(f"ref-{payment_id}")
            self.save(payment)

    server = server_url()
    with scratch_database(server, "bench_peer") as (name, _url):
        parts = urlsplit(server)
        app = Payments(
            env={
                "PERSISTENCE_MODULE": "eventsourcing.postgres",
                "POSTGRES_DBNAME": name,
                "POSTGRES_HOST": parts.hostname or "127.0.0.1",
                "POSTGRES_PORT": str(parts.port or 5432),
                "POSTGRES_USER": parts.username or "postgres",
                "POSTGRES_PASSWORD": parts.password or "",
                "POSTGRES_POOL_SIZE": str(workers),
                "POSTGRES_MAX_OVERFLOW": "0",
            }
        )
        try:
            counts = [0] * workers
            stop = threading.Event()
            measuring = threading.Event()

            def worker(index: int) -> None:
                n = 0
                while not stop.is_set():
                    payment_id = app.initiate(f"peer-{index}-n{n}")
                    app.complete(payment_id)
                    n += 1
                    if measuring.is_set():
                        counts[index] += 1

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
            for thread in threads:
                thread.start()
            time.sleep(warmup_s)
            cpu0 = time.process_time()
            measuring.set()
            started = time.perf_counter()
            time.sleep(seconds)
            measuring.clear()
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu0
            stop.set()
            for thread in threads:
                thread.join()
        finally:
            app.close()
    return PeerResult(
        workers=workers,
        seconds=elapsed,
        payments=sum(counts),
        cpu_s=cpu,
        load=load(),
        version=version("eventsourcing"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args(argv)
    print(f"peer: load before {load()}", flush=True)
    result = run(args.workers, args.seconds)
    print(table([result.row()], HEADER))
    return 0


if __name__ == "__main__":
    sys.exit(main())
