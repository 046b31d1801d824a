"""End-to-end benchmark: an open-loop orchestrator against the real `payment-service run`.

Starts everything it needs: an Apache Kafka broker (`--broker tansu` for the embedded
broker of `dev`; or $PAYMENT_TEST_KAFKA_BOOTSTRAP_SERVERS), a
fresh database on the local PostgreSQL ($PAYMENT_BENCH_POSTGRES_URL; dropped afterwards)
and the `run` process. The orchestrator offers requests at a fixed rate for a fixed time
(each is sent when it is due, whatever the answers so far: open loop), and listens to the
outcome topics. Latency runs from a request's *scheduled* send time to its terminal event,
so a sender that falls behind shows up in the figures instead of hiding them.

    .venv/bin/python bench/e2e.py --rate 1000 --duration 30
    .venv/bin/python bench/e2e.py --saturation
    .venv/bin/python bench/e2e.py --latency-ms 300 --rate 1000 --duration 30
    .venv/bin/python bench/e2e.py --rate 50 --task-cpu   # the service's CPU per asyncio task
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import (
    BenchError,
    Service,
    backend_pids,
    broker,
    cpu_by_pid,
    cpu_seconds,
    cpu_used,
    database_counters,
    free_port,
    load,
    peak_rss_mb,
    percentile,
    run_env,
    run_topics,
    runqueue_wait_s,
    scratch_database,
    server_url,
    steal_seconds,
    table,
    tail,
)
from orchestrator import Orchestrator
from past_payments import write_past_payments
from timeline import stages

from payment.adapters.kafka.topics import Topics

P99_LIMIT_MS = 250.0
WARMUP_S = 30.0  # unmeasured seconds at the first step's rate (see Plan.warmup_s)
DEFAULT_STEPS = (500, 1000, 1500, 2000, 2500, 3000, 3500, 4000)


@dataclass
class StepResult:
    """One measured period at one offered rate."""

    label: str
    offered_rate: float
    duration_s: float
    sent: int
    answered: int
    elapsed_s: float  # first scheduled send -> last outcome
    latencies_ms: list[float]
    service_cpu_s: float
    db_cpu_s: float
    broker_cpu_s: float
    orchestrator_cpu_s: float
    peak_rss_mb: float
    load: str
    send_lag_ms: float  # how far the sender fell behind its schedule at worst
    service_wait_s: float = 0.0  # runnable but waiting for a CPU (other processes had them)
    db_transactions: int = 0  # committed or rolled back in the bench database
    wal_bytes: int = 0  # the server's WAL written meanwhile (other databases' too)
    instances: int = 1
    steal_s: float = 0.0  # the VM's CPU time taken by other guests meanwhile (all CPUs)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.answered / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def p(self, q: float) -> float:
        value = percentile(self.latencies_ms, q)
        return float("nan") if value is None else value

    @property
    def sustained(self) -> bool:
        return (
            self.answered == self.sent
            and self.p(99) < P99_LIMIT_MS
            and self.throughput >= 0.95 * self.offered_rate
        )

    @property
    def cpu_ms_per_payment(self) -> float:
        return 1000 * self.service_cpu_s / self.answered if self.answered else float("nan")

    def row(self) -> list[str]:
        per = self.answered or 1
        return [
            self.label,
            f"{self.offered_rate:.0f}",
            f"{self.duration_s:.0f}",
            f"{self.answered}/{self.sent}",
            f"{self.throughput:.0f}",
            f"{self.p(50):.0f} / {self.p(95):.0f} / {self.p(99):.0f}",
            f"{self.cpu_ms_per_payment:.2f}",
            f"{100 * self.service_cpu_s / self.elapsed_s:.0f}%" if self.elapsed_s else "-",
            f"{100 * self.service_wait_s / self.elapsed_s:.0f}%" if self.elapsed_s else "-",
            f"{1000 * self.db_cpu_s / per:.2f}",
            f"{1000 * self.broker_cpu_s / per:.2f}",
            f"{self.db_transactions / per:.1f}",
            f"{self.wal_bytes / per:,.0f}",
            f"{self.peak_rss_mb:.0f}",
            f"{self.steal_s:.1f}",
            self.load,
        ]


HEADER = [
    "run",
    "offered/s",
    "s",
    "answered",
    "payments/s",
    "p50/p95/p99 ms",
    "svc CPU ms/pay",
    "svc CPU",
    "svc CPU wait",
    "PG ms/pay",
    "broker ms/pay",
    "PG tx/pay",
    "WAL B/pay",
    "peak RSS MB",
    "steal s",
    "load 1/5/15",
]


@dataclass
class Probes:
    """The processes whose CPU a step accounts for."""

    service_pids: list[int]
    backend_pids: Callable[[], list[int]]
    broker_pid: int | None
    database_counters: Callable[[], tuple[int, int]]

    def read(self) -> Reading:
        service_cpu_s = sum(map(cpu_seconds, self.service_pids))
        service_wait_s = sum(map(runqueue_wait_s, self.service_pids))
        transactions, wal_bytes = self.database_counters()
        return Reading(
            service_cpu_s=service_cpu_s,
            service_wait_s=service_wait_s,
            db_transactions=transactions,
            wal_bytes=wal_bytes,
            db_cpu_by_pid=cpu_by_pid(self.backend_pids()),
            broker_cpu_s=cpu_seconds(self.broker_pid) if self.broker_pid else 0.0,
            own_cpu_s=time.process_time(),
            steal_s=steal_seconds(),
        )


@dataclass(frozen=True)
class Reading:
    """The probes' counters at one moment; a step accounts for the difference of two."""

    service_cpu_s: float
    service_wait_s: float
    db_transactions: int
    wal_bytes: int
    db_cpu_by_pid: dict[int, float]
    broker_cpu_s: float
    own_cpu_s: float
    steal_s: float


async def measure(
    orchestrator: Orchestrator,
    probes: Probes,
    label: str,
    rate: float,
    duration_s: float,
    drain_s: float,
) -> StepResult:
    loop = asyncio.get_running_loop()
    before = probes.read()
    t0 = loop.time()
    bookings, lag = await orchestrator.offer(f"{label}-{uuid.uuid4().hex[:6]}", rate, duration_s)
    answered = await orchestrator.wait_answered(bookings, drain_s)
    # Backends that appeared during the step (the pool grew) count from zero: close enough.
    after = probes.read()
    first_sent = orchestrator.sent_at[bookings[0]]
    end = orchestrator.last_outcome if answered else loop.time()
    latencies = sorted(
        1000 * orchestrator.latency[b] for b in bookings if b in orchestrator.latency
    )
    return StepResult(
        label=label,
        offered_rate=rate,
        duration_s=duration_s,
        sent=len(bookings) - orchestrator.send_failures,
        answered=answered,
        elapsed_s=max(end - min(first_sent, t0 + 0.01), 1e-9),
        latencies_ms=latencies,
        service_cpu_s=after.service_cpu_s - before.service_cpu_s,
        db_cpu_s=cpu_used(before.db_cpu_by_pid, after.db_cpu_by_pid),
        broker_cpu_s=after.broker_cpu_s - before.broker_cpu_s,
        orchestrator_cpu_s=after.own_cpu_s - before.own_cpu_s,
        peak_rss_mb=max(map(peak_rss_mb, probes.service_pids)),
        load=load(),
        send_lag_ms=1000 * lag,
        service_wait_s=after.service_wait_s - before.service_wait_s,
        db_transactions=after.db_transactions - before.db_transactions,
        wal_bytes=after.wal_bytes - before.wal_bytes,
        instances=len(probes.service_pids),
        steal_s=after.steal_s - before.steal_s,
    )


async def warm_up(orchestrator: Orchestrator, rate: float, seconds: float) -> None:
    """One request answered end to end (the group is joined), then a short unmeasured run."""
    bookings, _ = await orchestrator.offer(f"warm-{uuid.uuid4().hex[:6]}", 1, 1)
    if await orchestrator.wait_answered(bookings, 60) != 1:
        raise BenchError("the warm-up request got no outcome within 60 s")
    if seconds > 0:
        bookings, _ = await orchestrator.offer(f"warm-{uuid.uuid4().hex[:6]}", rate, seconds)
        await orchestrator.wait_answered(bookings, 30)


@dataclass
class Plan:
    rates: list[float]
    duration_s: float
    latency_ms: float = 0.0
    saturation: bool = False
    drain_s: float = 30.0
    # A freshly started JVM interprets, then compiles, Kafka's request paths: 200/s on a
    # broker 3 s old cost it 3.3 ms of CPU per payment, 1.0-1.2 after 30-60 s (session 6),
    # and the service waited for a CPU the broker's compiler had. Brokers users run are warm.
    warmup_s: float = WARMUP_S
    env: dict[str, str] = field(default_factory=dict)
    bisect: bool = True
    profile: str | None = None  # py-spy raw (collapsed) stacks of the first measured step
    task_cpu: bool = False  # CPU per asyncio task of the first measured step (task_cpu/)
    keep_log: bool = False
    # The consumers' fetch wait (the service's and the orchestrator's). None: the service's
    # default on Kafka (which answers as data arrives), 5 ms on Tansu (which answers only
    # when it expires: both a latency per hop and a fixed CPU cost there).
    fetch_wait_ms: int | None = None
    broker: str | None = None  # kafka (default) or tansu
    timeline: bool = False  # print where the last step's payments spent their time
    instances: int = 1  # service processes in one consumer group
    past_payments: int = 0  # written into the store before the service starts (past_payments.py)


async def _run_steps(
    bootstrap: str,
    topics: Topics,
    run_id: str,
    probes: Probes,
    plan: Plan,
    fetch_wait_ms: int,
    db_url: str,
) -> list[StepResult]:
    results: list[StepResult] = []
    tag = f"lat{plan.latency_ms:g}" if plan.latency_ms else "zero"
    async with Orchestrator(bootstrap, topics, run_id, fetch_wait_ms) as orchestrator:
        await warm_up(orchestrator, min(plan.rates[0], 500), plan.warmup_s)
        rates = list(plan.rates)
        passed: float | None = None
        while rates:
            rate = rates.pop(0)
            label = f"{'sat' if plan.saturation else 'rate'}-{tag}-{rate:.0f}"
            spy = _start_profile(plan, probes.service_pids[0]) if not results else None
            first = not results
            tasks = TaskCpu(run_id, probes.service_pids[0]) if plan.task_cpu and first else None
            result = await measure(orchestrator, probes, label, rate, plan.duration_s, plan.drain_s)
            if spy is not None:
                await asyncio.to_thread(spy.wait)
            if tasks is not None:
                print(await tasks.table(result.answered), flush=True)
            results.append(result)
            print(
                f"e2e: {label}: {result.throughput:.0f}/s, p99 {result.p(99):.0f} ms,"
                f" {result.answered}/{result.sent} answered,"
                f" {result.cpu_ms_per_payment:.2f} ms CPU/payment, load {result.load};"
                f" sender fell behind by {result.send_lag_ms:.0f} ms at worst,"
                f" orchestrator CPU {result.orchestrator_cpu_s:.1f} s",
                flush=True,
            )
            if not plan.saturation:
                continue
            if result.sustained:
                passed = rate
                continue
            rates = []
            if plan.bisect and passed is not None and rate - passed > 250:
                # One more step halfway, once the backlog of this one has drained.
                await orchestrator.wait_answered(list(orchestrator.sent_at), plan.drain_s)
                plan.bisect = False
                rates = [passed + round((rate - passed) / 2 / 100) * 100]
        if plan.timeline:
            print(await _timeline(orchestrator, bootstrap, topics, db_url, results[-1]), flush=True)
    return results


async def _timeline(
    orchestrator: Orchestrator, bootstrap: str, topics: Topics, db_url: str, step: StepResult
) -> str:
    """The stages of the last step's payments (bench/timeline.py), on wall-clock time."""
    wall = time.time() - asyncio.get_running_loop().time()
    prefix = f"{step.label}-"
    scheduled = {b: wall + t for b, t in orchestrator.sent_at.items() if b.startswith(prefix)}
    received = {
        b: scheduled[b] + orchestrator.latency[b] for b in scheduled if b in orchestrator.latency
    }
    return f"\ntimeline of {step.label}:\n" + await stages(
        db_url, bootstrap, topics, scheduled, received
    )


class TaskCpu:
    """The service's CPU per asyncio task over a step (`--task-cpu`): task_cpu/sitecustomize.py
    in the service appends its totals to a file at each SIGUSR2, here at the step's start
    and at its end."""

    def __init__(self, run_id: str, pid: int) -> None:
        self._path = task_cpu_file(run_id)
        self._pid = pid
        os.kill(pid, signal.SIGUSR2)

    async def table(self, payments: int) -> str:
        """The step's CPU per task, per payment answered, largest first."""
        os.kill(self._pid, signal.SIGUSR2)
        for _ in range(50):  # the service writes between two bytecodes of its loop
            await asyncio.sleep(0.1)
            dumps = await asyncio.to_thread(_task_cpu_dumps, self._path)
            if len(dumps) >= 2:
                break
        else:
            return "\nservice CPU per task: the service wrote no totals"
        os.unlink(self._path)
        before, after = dumps[-2:]
        per = max(payments, 1)
        total = 1000 * (after["cpu_s"] - before["cpu_s"])
        spent = {n: ms - before["cpu_ms"].get(n, 0.0) for n, ms in after["cpu_ms"].items()}
        runs = {n: k - before["runs"].get(n, 0) for n, k in after["runs"].items()}
        rows = [
            [name, f"{ms / per:.3f}", f"{runs.get(name, 0) / per:.2f}", f"{100 * ms / total:.1f}"]
            for name, ms in sorted(spent.items(), key=lambda kv: -kv[1])[:20]
            if ms > 0 and total > 0
        ]
        header = ["task or callback", "CPU ms/payment", "runs/payment", "% of the process"]
        return f"\nservice CPU per task ({total / per:.3f} ms/payment in all):\n" + table(
            rows, header
        )


def task_cpu_file(run_id: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"bench-task-cpu-{run_id}.jsonl")


def _task_cpu_dumps(path: str) -> list[dict[str, Any]]:
    """The totals the service wrote so far, oldest first (a line still being written: not)."""
    if not os.path.exists(path):
        return []  # the service has not answered a signal yet
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.endswith("\n")]


def _start_profile(plan: Plan, pid: int) -> subprocess.Popen[bytes] | None:
    if plan.profile is None:
        return None
    py_spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            f"{plan.duration_s:.0f}",
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            plan.profile,
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def service_id_kind() -> str:
    """The ids the service under test makes: v7 since session 15 (payment.domain.ids), else v4.

    The bench runs with the service's source first on its path (bench/ab.py's sides)."""
    return "v7" if importlib.util.find_spec("payment.domain.ids") is not None else "v4"


def run(plan: Plan) -> list[StepResult]:
    """Start the broker, a scratch database and the service; run the plan; clean up."""
    run_id = uuid.uuid4().hex[:8]
    topics = run_topics(run_id)
    server = server_url()
    with broker(plan.broker) as kafka, scratch_database(server, "bench_e2e") as (db, url):
        bootstrap = kafka.bootstrap
        print(f"e2e: broker {kafka.label}", flush=True)
        env = {
            **os.environ,
            "PAYMENT_DATABASE_URL": url,
            "PAYMENT_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            **kafka.service_env(plan.fetch_wait_ms),
            **run_env(run_id, topics),
            "PAYMENT_FAKE_LATENCY_MS": f"{plan.latency_ms:g}",
            **plan.env,
        }
        if plan.task_cpu:
            here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "task_cpu")
            env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
            env["PAYMENT_BENCH_TASK_CPU"] = task_cpu_file(run_id)
        services = [
            Service({**env, "PAYMENT_HTTP_PORT": str(free_port())}, f"bench-e2e-{run_id}-{n}")
            for n in range(plan.instances)
        ]
        ok = False
        try:
            services[0].migrate()
            if plan.past_payments:
                kind = service_id_kind()
                took = write_past_payments(url, kind, plan.past_payments, f"bench-e2e-{run_id}")
                print(
                    f"e2e: {plan.past_payments:,} past payments ({kind} ids) in {took:.0f} s",
                    flush=True,
                )
            for service in services:
                ready = service.start()
                print(f"e2e: service ready after {ready:.1f} s ({service.log.name})", flush=True)
            probes = Probes(
                service_pids=[service.pid for service in services],
                backend_pids=lambda: backend_pids(server, db),
                broker_pid=kafka.pid,
                database_counters=lambda: database_counters(server, db),
            )
            client_wait = kafka.client_fetch_wait_ms(plan.fetch_wait_ms)
            results = asyncio.run(
                _run_steps(bootstrap, topics, run_id, probes, plan, client_wait, url)
            )
            for service in services:
                if not service.alive():
                    raise BenchError("a service died during the run:\n" + tail(service.log.name))
            ok = True
        finally:
            for service in services:
                code = service.stop()
                if ok and code != 0:
                    print(f"e2e: WARNING: the service exited with {code} on SIGTERM", flush=True)
                if ok and code == 0 and not plan.keep_log:
                    service.discard_log()
                else:
                    print(f"e2e: service log kept in {service.log.name}", flush=True)
    return results


def saturation_of(results: Sequence[StepResult]) -> StepResult | None:
    """The highest-rate step that held (all answered, p99 < 250 ms, ≥ 95 % of offered)."""
    held = [r for r in results if r.sustained]
    return max(held, key=lambda r: r.offered_rate) if held else None


def _env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--env expects KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000, help="requests/s offered")
    parser.add_argument("--duration", type=float, default=30, help="seconds per measured step")
    parser.add_argument("--saturation", action="store_true", help="step the rate up")
    parser.add_argument(
        "--steps",
        default=",".join(map(str, DEFAULT_STEPS)),
        help="rates of --saturation, ascending",
    )
    parser.add_argument("--latency-ms", type=float, default=0, help="fake processor latency")
    parser.add_argument(
        "--drain", type=float, default=Plan.drain_s, help="seconds to wait for stragglers"
    )
    parser.add_argument(
        "--warmup", type=float, default=Plan.warmup_s, help="unmeasured seconds first"
    )
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the service")
    parser.add_argument("--profile", help="py-spy collapsed stacks of the first step, to FILE")
    parser.add_argument(
        "--task-cpu", action="store_true", help="the first step's service CPU per asyncio task"
    )
    parser.add_argument("--keep-log", action="store_true", help="keep the service log")
    parser.add_argument("--instances", type=int, default=1, help="service processes, one group")
    parser.add_argument(
        "--timeline", action="store_true", help="where the last step's payments spent time"
    )
    parser.add_argument(
        "--fetch-wait-ms", type=int, default=None, help="consumers' fetch wait (ms)"
    )
    parser.add_argument(
        "--past-payments",
        type=int,
        default=0,
        help="payments in the store before the run, with ids of the kind the service makes",
    )
    parser.add_argument(
        "--broker",
        choices=("kafka", "tansu"),
        default=None,
        help="broker started for the run: kafka (default) or tansu ($PAYMENT_BENCH_BROKER)",
    )
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.steps.split(",")] if args.saturation else [args.rate]
    plan = Plan(
        rates=rates,
        duration_s=args.duration,
        latency_ms=args.latency_ms,
        saturation=args.saturation,
        drain_s=args.drain,
        warmup_s=args.warmup,
        env=_env_pairs(args.env),
        profile=args.profile,
        task_cpu=args.task_cpu,
        keep_log=args.keep_log,
        fetch_wait_ms=args.fetch_wait_ms,
        broker=args.broker,
        timeline=args.timeline,
        instances=args.instances,
        past_payments=args.past_payments,
    )
    print(f"e2e: load before {load()} on {os.cpu_count()} CPUs", flush=True)
    try:
        results = run(plan)
    except BenchError as exc:
        print(f"e2e: {exc}", file=sys.stderr)
        return 1
    print()
    print(table([r.row() for r in results], HEADER))
    if args.saturation:
        best = saturation_of(results)
        print(
            "\nsaturation (p99 < 250 ms, all answered): "
            + (
                f"{best.throughput:.0f} payments/s at {best.offered_rate:.0f}/s offered"
                if best
                else "no step held"
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
