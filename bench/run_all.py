"""Every benchmark in one run, one after the other, and the final table against the targets.

    .venv/bin/python bench/run_all.py            # about 10 minutes
    .venv/bin/python bench/run_all.py --quick    # shorter steps, about 4 minutes

In order: the event store against pgbench's ceiling (bench/event_store.py); the peer, the
`eventsourcing` library (bench/peer_eventsourcing.py); then the real service end to end
(bench/e2e.py): 1,000 requests/s offered (latency target), the saturation search with
the zero-latency fake processor and a sustained run at the rate found, and 1,000/s with
the fake processor at 300 ms. Each part starts and cleans up what it needs. The machine's
load average is printed with every figure: on a shared machine, read CPU per payment.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import event_store
import peer_eventsourcing
from benchlib import BenchError, load, table

import e2e


@dataclass
class Line:
    measure: str
    value: str
    target: str
    met: str
    load: str


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter steps")
    parser.add_argument("--peer-workers", type=int, default=8)
    parser.add_argument("--steps", default="200,300,400,600,800,1000,1200,1500")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the service")
    args = parser.parse_args(argv)
    step_s = 10.0 if args.quick else 20.0
    sustain_s = 20.0 if args.quick else 60.0
    measure_s = 10.0 if args.quick else 30.0
    env = e2e._env_pairs(args.env)
    print(f"run_all: load before {load()} on {os.cpu_count()} CPUs", flush=True)
    try:
        store = event_store.run(tasks=8, seconds=5 if args.quick else 10)
        print(table([r.row() for r in store], event_store.HEADER), flush=True)

        peer = peer_eventsourcing.run(args.peer_workers, 5 if args.quick else 10)
        print(table([peer.row()], peer_eventsourcing.HEADER), flush=True)

        at_1000 = e2e.run(
            e2e.Plan(
                rates=[1000],
                duration_s=measure_s,
                env=env,
            )
        )[0]
        steps = e2e.run(
            e2e.Plan(
                rates=[float(r) for r in args.steps.split(",")],
                duration_s=step_s,
                saturation=True,
                env=env,
            )
        )
        best = e2e.saturation_of(steps)
        sustained: e2e.StepResult | None = None
        if best is not None:
            sustained = e2e.run(
                e2e.Plan(
                    rates=[best.offered_rate],
                    duration_s=sustain_s,
                    env=env,
                )
            )[0]
            sustained.label = f"sustained-{best.offered_rate:.0f}"
        slow = e2e.run(
            e2e.Plan(
                rates=[1000],
                duration_s=measure_s,
                latency_ms=300,
                env=env,
            )
        )[0]
    except BenchError as exc:
        print(f"run_all: {exc}", file=sys.stderr)
        return 1

    runs = [at_1000, *steps, *([sustained] if sustained else []), slow]
    print()
    print(table([r.row() for r in runs], e2e.HEADER))

    held = sustained if sustained is not None and sustained.sustained else None
    top = held or best
    # The peer runs closed loop, as fast as it can: set beside it the most payments/s any
    # zero-latency run completed with every request answered, whatever its latency.
    zero_latency = [at_1000, *steps, *([sustained] if sustained else [])]
    answered = [r for r in zero_latency if r.answered == r.sent]
    most = max(answered, key=lambda r: r.throughput) if answered else None
    ours = most.throughput if most else 0.0
    ratio = ours / peer.rate if peer.rate else float("nan")
    peak_rss = max(r.peak_rss_mb for r in runs)
    lines = [
        Line(
            "e2e payments/s holding p99 < 250 ms, zero-latency fake"
            + (f", for {sustain_s:.0f} s" if held else f" ({step_s:.0f} s step)" if top else ""),
            f"{top.throughput:.0f} (p99 {top.p(99):.0f} ms)" if top else "no step held",
            ">= 2500 for 60 s",
            _yes(held is not None and held.throughput >= 2500 and sustain_s >= 60),
            top.load if top else load(),
        ),
        Line(
            "e2e payments/s completed, zero-latency fake (most of any run)",
            f"{ours:.0f} at {most.offered_rate:.0f}/s offered (p99 {most.p(99):.0f} ms)"
            if most
            else "-",
            ">= 2500",
            _yes(ours >= 2500),
            most.load if most else load(),
        ),
        Line(
            "e2e payments/s, fake at 300 ms, 1000/s offered",
            f"{slow.throughput:.0f} (p99 {slow.p(99):.0f} ms, {slow.answered}/{slow.sent})",
            ">= 1000",
            _yes(slow.throughput >= 1000 * 0.98 and slow.answered == slow.sent),
            slow.load,
        ),
        Line(
            "request->outcome at 1000/s offered, p50 / p99",
            f"{at_1000.p(50):.0f} / {at_1000.p(99):.0f} ms ({at_1000.throughput:.0f}/s)",
            "<= 40 / <= 150 ms",
            _yes(at_1000.p(50) <= 40 and at_1000.p(99) <= 150),
            at_1000.load,
        ),
        Line(
            f"ours end to end (most completed/s) / eventsourcing {peer.version}"
            f" ({peer.rate:.0f} payments/s)",
            f"{ratio:.1f}x",
            ">= 5x",
            _yes(ratio >= 5),
            peer.load,
        ),
        *(
            Line(
                f"{r.what.removeprefix('ours: ')} (no broker) / eventsourcing",
                f"{r.rate / peer.rate:.1f}x ({r.rate:,.0f} payments/s)",
                ">= 5x (context)",
                _yes(r.rate / peer.rate >= 5),
                r.load,
            )
            for r in store
            if r.unit == "payments" and peer.rate
        ),
        Line("service peak RSS", f"{peak_rss:.0f} MB", "<= 300 MB", _yes(peak_rss <= 300), "-"),
        Line(
            "CPU per payment at 1000/s: service / PostgreSQL / broker",
            f"{at_1000.cpu_ms_per_payment:.2f} / {1000 * at_1000.db_cpu_s / at_1000.answered:.2f}"
            f" / {1000 * at_1000.broker_cpu_s / at_1000.answered:.2f} ms",
            "-",
            "-",
            at_1000.load,
        ),
    ]
    print()
    print(
        table(
            [[x.measure, x.value, x.target, x.met, x.load] for x in lines],
            ["measure", "result", "target", "met", "load 1/5/15"],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
