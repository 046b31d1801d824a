"""Burst benchmark: N payment requests at once against a real `payment-service run`."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import time
import uuid

from benchlib import (
    POSTGRES_ENV_VAR,
    READY_TIMEOUT_S,
    BenchError,
    Service,
    broker,
    free_port,
    run_env,
    run_topics,
    scratch_database,
    server_url,
    tail,
)

from payment.adapters.kafka.topics import Topics
from payment.devtools.demo import DemoReport, run_demo


async def _measure(
    bootstrap: str, topics: Topics, run_id: str, count: int, timeout_s: float, service: Service
) -> DemoReport:
    # Ready means the database and broker answer, not that the consumer group has been
    # joined and partitions assigned (seconds on some brokers): one request answered
    # end to end keeps that start-up out of the figures.
    started = time.monotonic()
    warm_up = await run_demo(
        bootstrap,
        count=1,
        topics=topics,
        source=f"burst-{run_id}",
        timeout_s=READY_TIMEOUT_S,
        out=io.StringIO(),
        extras=False,
        settle_s=0,
    )
    if not warm_up.ok:
        raise BenchError("the warm-up request got no outcome:\n" + tail(service.log.name))
    print(f"burst: warm-up request answered after {time.monotonic() - started:.1f} s")
    print(f"burst: sending {count} requests at once")
    return await run_demo(
        bootstrap,
        count=count,
        topics=topics,
        source=f"burst-{run_id}",
        timeout_s=timeout_s,
        extras=False,
        settle_s=0.5,
    )


def _figures(report: DemoReport, count: int) -> list[str]:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    failed = ", ".join(f"{k} {v}" for k, v in report.failed_by_reason.items()) or "0"
    rate = "-" if report.payments_per_s is None else f"{report.payments_per_s:.0f}"
    return [
        f"requests             {count}",
        f"terminal             {count - report.no_outcome} "
        f"(completed {report.completed}, failed {failed})",
        f"time to last outcome {report.outcomes_s:.2f} s",
        f"payments/s           {rate}",
        f"latency p50/p95/p99  {ms(report.latency_p50_ms)} / {ms(report.latency_p95_ms)} / "
        f"{ms(report.latency_p99_ms)} ms",
        f"two distinct outcomes for one booking: {report.conflicting_outcomes}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1000, help="requests to send at once")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for outcomes")
    parser.add_argument(
        "--postgres",
        default=server_url(),
        help=f"server URL of a role that may create databases (${POSTGRES_ENV_VAR})",
    )
    parser.add_argument("--keep-log", action="store_true", help="keep the service log on success")
    args = parser.parse_args(argv)
    run_id = uuid.uuid4().hex[:10]
    topics = run_topics(run_id)
    service: Service | None = None
    try:
        with broker() as kafka, scratch_database(args.postgres, "bench_burst") as (db, db_url):
            bootstrap = kafka.bootstrap
            env = {
                **os.environ,
                "PAYMENT_DATABASE_URL": db_url,
                "PAYMENT_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                **kafka.service_env(),
                "PAYMENT_HTTP_PORT": str(free_port()),
                **run_env(run_id, topics),
            }
            service = Service(env, f"burst-{run_id}")
            service.migrate()
            print(f"burst: broker {bootstrap}, database {db}, log {service.log.name}")
            try:
                ready_s = service.start()
                print(f"burst: service ready after {ready_s:.1f} s")
                report = asyncio.run(
                    _measure(bootstrap, topics, run_id, args.count, args.timeout, service)
                )
                alive = service.alive()
            finally:
                stopping = time.monotonic()
                code = service.stop()
                stop_s = time.monotonic() - stopping
        print("\nburst results")
        for line in _figures(report, args.count):
            print(f"  {line}")
        print(f"  service exit after SIGTERM: {code} in {stop_s:.1f} s")
        problems = list(report.problems)
        if not alive:
            problems.append("the service died during the burst")
        if code != 0:
            problems.append(f"the service exited with {code} on SIGTERM (expected 0)")
        if problems:
            print("burst: FAILED: " + "; ".join(problems))
            print(f"--- service log tail ({service.log.name}) ---\n{tail(service.log.name)}")
            return 1
        print("burst: OK")
        if args.keep_log:
            print(f"burst: service log kept in {service.log.name}")
        else:
            service.discard_log()
        return 0
    except BenchError as exc:
        print(f"burst: {exc}", file=sys.stderr)
        return 1
    finally:
        if service is not None:
            service.log.close()


if __name__ == "__main__":
    sys.exit(main())
