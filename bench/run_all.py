"""Every benchmark in one run, one after the other, and issue 15's table against its targets.

    .venv/bin/python bench/run_all.py            # about 10 minutes
    .venv/bin/python bench/run_all.py --quick    # shorter steps, about 6 minutes

In order: the event store against pgbench's ceiling (bench/event_store.py, context); the
peer, the `eventsourcing` library (bench/peer_eventsourcing.py); then the real service end
to end on Apache Kafka (bench/e2e.py), each run with its own broker and database: 200/s
and 1,000/s offered (latency), 3,000/s offered for 60 s (throughput), and 1,000/s with the
fake gateway answering in 300 ms; and the floor (bench/floor.py): the same hops through a
stand-in that only consumes, commits and sends on, at 200/s, 1,000/s and 3,000/s. Every
row says what bounds it when its target is not met: the figures of its own run (CPU per
payment of each program against the machine's CPUs, the service's time runnable without
a CPU). The machine's load average is printed with every figure: on a shared machine,
read CPU per payment.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import event_store
import floor
import peer_eventsourcing
from benchlib import BenchError, load, table

import e2e

TABLE_HEADER = ["measure", "figure", "target", "met?", "what bounds it", "load 1/5/15"]


@dataclass
class Line:
    measure: str
    figure: str
    target: str
    met: bool | None  # None: context, no target
    bound: str
    load: str

    def cells(self) -> list[str]:
        met = "-" if self.met is None else "yes" if self.met else "NO"
        return [
            self.measure,
            self.figure,
            self.target,
            met,
            self.bound if not self.met else "",
            self.load,
        ]


def machine_bound(run: e2e.StepResult) -> str:
    """What the run's own figures say bounds it: CPU of the service, PostgreSQL and the
    broker per payment, times the rate, against the machine's CPUs; and how much of the
    time the service was runnable without a CPU (other processes had them)."""
    per = run.answered or 1
    total_ms = 1000 * (run.service_cpu_s + run.db_cpu_s + run.broker_cpu_s + run.orchestrator_cpu_s)
    cpus = os.cpu_count() or 1
    used = total_ms / 1000 / run.elapsed_s if run.elapsed_s else 0.0
    return (
        f"CPU: {total_ms / per:.2f} ms/payment over svc+PG+broker+load generator"
        f" = {used:.1f} of {cpus} CPUs at {run.throughput:.0f}/s; the service was runnable"
        f" without a CPU {100 * run.service_wait_s / run.elapsed_s:.0f}% of the time"
        f" (load {run.load.split()[0]}: other processes had the CPUs)"
    )


def floor_bound(run: e2e.StepResult) -> str:
    """What the floor (bench/floor.py) did at the same rate in this run."""
    return (
        f"the floor at {run.offered_rate:.0f}/s (consume, commit, send on; no service):"
        f" p50 / p99 {run.p(50):.0f} / {run.p(99):.0f} ms,"
        f" {run.cpu_ms_per_payment:.2f} ms of its CPU per payment"
    )


def service_bound(run: e2e.StepResult, rate: float) -> str:
    """What the service's own path (its process, its PostgreSQL backends, the broker) cost
    per payment in `run`, and how many CPUs that would take at `rate`."""
    per = run.answered or 1
    costs = [1000 * cpu_s / per for cpu_s in (run.service_cpu_s, run.db_cpu_s, run.broker_cpu_s)]
    return (
        f"the service's path: svc {costs[0]:.2f} + PG {costs[1]:.2f} + broker {costs[2]:.2f}"
        f" ms/payment at its {run.throughput:.0f}/s, {sum(costs) * rate / 1000:.1f} CPUs at"
        f" {rate:.0f}/s of the machine's {os.cpu_count() or 1}"
    )


def issue_table(
    runs: list[e2e.StepResult],
    peer: peer_eventsourcing.PeerResult,
    store: list[event_store.StoreResult],
    sustain_s: float,
    floors: list[e2e.StepResult],
) -> list[Line]:
    """Issue 15's table: each measure, its figure from this run, its target, whether met,
    and what bounds it when not."""
    at_200, at_1000, at_3000, slow = runs
    floor_200, floor_1000, floor_3000 = floors
    answered = [r for r in runs[:3] if r.answered >= 0.95 * r.sent]
    most = max(answered, key=lambda r: r.throughput) if answered else at_1000
    ratio = most.throughput / peer.rate if peer.rate else float("nan")
    peak_run = max(runs, key=lambda r: r.peak_rss_mb)
    peak_rss = peak_run.peak_rss_mb
    share_3000 = at_3000.answered / at_3000.sent if at_3000.sent else 0.0

    def latency(run: e2e.StepResult, p50: float, p99: float, floor: e2e.StepResult) -> Line:
        return Line(
            f"request -> outcome at {run.offered_rate:.0f}/s, p50 / p99",
            f"{run.p(50):.0f} / {run.p(99):.0f} ms ({run.throughput:.0f}/s)",
            f"<= {p50:.0f} / <= {p99:.0f} ms",
            run.p(50) <= p50 and run.p(99) <= p99,
            f"{machine_bound(run)}; {floor_bound(floor)}",
            run.load,
        )

    return [
        latency(at_200, 15, 50, floor_200),
        latency(at_1000, 30, 100, floor_1000),
        Line(
            f"payments/s at 3000/s offered for {sustain_s:.0f} s (>= 95 % answered, p99 <= 1 s)",
            f"{at_3000.throughput:.0f}/s, {100 * share_3000:.0f} % answered,"
            f" p99 {at_3000.p(99):.0f} ms",
            ">= 3000",
            at_3000.throughput >= 0.95 * 3000 and share_3000 >= 0.95 and at_3000.p(99) <= 1000,
            f"{service_bound(at_3000, 3000)}; {floor_bound(floor_3000)}",
            at_3000.load,
        ),
        Line(
            f"ratio to eventsourcing {peer.version} in this run ({peer.rate:.0f} payments/s,"
            f" 8 threads, no broker)",
            f"{ratio:.1f}x ({most.throughput:.0f}/s at {most.offered_rate:.0f}/s offered)",
            ">= 5x",
            ratio >= 5,
            "ours pays the broker hops (3 records, 2 relay passes per payment) on the same"
            f" CPUs; {service_bound(at_3000, 5 * peer.rate)}; {floor_bound(floor_3000)}",
            peer.load,
        ),
        Line(
            "with a gateway answering in 300 ms, 1000/s offered: payments/s, p99",
            f"{slow.throughput:.0f}/s, p99 {slow.p(99):.0f} ms ({slow.answered}/{slow.sent})",
            ">= 1000/s, p99 <= 600 ms",
            slow.throughput >= 0.98 * 1000 and slow.answered == slow.sent and slow.p(99) <= 600,
            machine_bound(slow),
            slow.load,
        ),
        Line(
            "service CPU per payment at 1000/s",
            f"{at_1000.cpu_ms_per_payment:.2f} ms (PostgreSQL"
            f" {1000 * at_1000.db_cpu_s / (at_1000.answered or 1):.2f}, broker"
            f" {1000 * at_1000.broker_cpu_s / (at_1000.answered or 1):.2f})",
            "<= 0.25 ms",
            at_1000.cpu_ms_per_payment <= 0.25,
            "psycopg, aiokafka and the handlers' Python per record (docs/performance.md); "
            f"{floor_bound(floor_1000)}; {floor_bound(floor_3000)}",
            at_1000.load,
        ),
        Line(
            "service peak RSS",
            f"{peak_rss:.0f} MB",
            "<= 300 MB",
            peak_rss <= 300,
            f"in {peak_run.label}, {peak_run.answered:,} payments measured after its warm-up:"
            " it includes the fake gateway's in-process ledger, one entry kept per charge"
            " (docs/performance.md)",
            "-",
        ),
        *(
            Line(
                f"context: {r.what.removeprefix('ours: ')} (no broker) / eventsourcing",
                f"{r.rate / peer.rate:.1f}x ({r.rate:,.0f} payments/s)",
                "-",
                None,
                "",
                r.load,
            )
            for r in store
            if r.unit == "payments" and peer.rate
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter steps")
    parser.add_argument("--peer-workers", type=int, default=8)
    parser.add_argument(
        "--broker", choices=("kafka", "tansu"), default=None, help="e2e broker (default kafka)"
    )
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the service")
    args = parser.parse_args(argv)
    latency_s = 10.0 if args.quick else 30.0
    sustain_s = 20.0 if args.quick else 60.0
    env = e2e._env_pairs(args.env)
    print(f"run_all: load before {load()} on {os.cpu_count()} CPUs", flush=True)

    def e2e_run(rate: float, seconds: float, latency_ms: float = 0.0) -> e2e.StepResult:
        plan = e2e.Plan(
            rates=[rate], duration_s=seconds, latency_ms=latency_ms, env=env, broker=args.broker
        )
        return e2e.run(plan)[0]

    try:
        store = event_store.run(tasks=8, seconds=5 if args.quick else 10)
        print(table([r.row() for r in store], event_store.HEADER), flush=True)

        peer = peer_eventsourcing.run(args.peer_workers, 5 if args.quick else 10)
        print(table([peer.row()], peer_eventsourcing.HEADER), flush=True)

        at_200 = e2e_run(200, latency_s)
        at_1000 = e2e_run(1000, latency_s)
        at_3000 = e2e_run(3000, sustain_s)
        slow = e2e_run(1000, latency_s, latency_ms=300)
        floors = floor.run([200, 1000, 3000], latency_s, e2e.WARMUP_S)
    except BenchError as exc:
        print(f"run_all: {exc}", file=sys.stderr)
        return 1

    runs = [at_200, at_1000, at_3000, slow]
    print()
    print(table([r.row() for r in [*runs, *floors]], e2e.HEADER))
    print()
    lines = issue_table(runs, peer, store, sustain_s, floors)
    print(table([x.cells() for x in lines], TABLE_HEADER))
    return 0


if __name__ == "__main__":
    sys.exit(main())
