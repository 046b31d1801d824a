"""Burst benchmark: N payment requests at once against a real `payment-service run`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import psycopg
from benchlib import broker
from psycopg import sql

from payment.adapters.kafka.topics import Topics
from payment.devtools.demo import DemoReport, run_demo

POSTGRES_ENV_VAR = "PAYMENT_BENCH_POSTGRES_URL"
DEFAULT_POSTGRES = "postgresql://root@127.0.0.1:5432/postgres"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class BenchError(Exception):
    """The bench could not set up or the service misbehaved outside the measurement."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def _database(server_url: str, name: str) -> Iterator[str]:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    finally:
        # FORCE: a service that did not exit cleanly must not keep the database alive.
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _tail(log: IO[bytes], lines: int = 40) -> str:
    log.flush()
    text = Path(log.name).read_bytes()[-16_384:].decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def _wait_ready(service: subprocess.Popen[bytes], port: int, log: IO[bytes]) -> float:
    started = time.monotonic()
    url = f"http://127.0.0.1:{port}/health/ready"
    while time.monotonic() - started < READY_TIMEOUT_S:
        if service.poll() is not None:
            raise BenchError(
                f"payment-service run exited with {service.returncode} before it was ready:\n"
                + _tail(log)
            )
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or 503 until the database and broker answer
        time.sleep(0.1)
    raise BenchError(f"payment-service run not ready within {READY_TIMEOUT_S:g} s:\n" + _tail(log))


async def _measure(
    bootstrap: str, topics: Topics, run_id: str, count: int, timeout_s: float, log: IO[bytes]
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
        raise BenchError("the warm-up request got no outcome:\n" + _tail(log))
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


def _stop(service: subprocess.Popen[bytes]) -> tuple[int, float]:
    started = time.monotonic()
    if service.poll() is None:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
    return service.returncode, time.monotonic() - started


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
        default=os.environ.get(POSTGRES_ENV_VAR, DEFAULT_POSTGRES),
        help=f"server URL of a role that may create databases (${POSTGRES_ENV_VAR})",
    )
    parser.add_argument("--keep-log", action="store_true", help="keep the service log on success")
    args = parser.parse_args(argv)
    executable = Path(sys.executable).parent / "payment-service"
    run_id = uuid.uuid4().hex[:10]
    # Own topics and group: on a shared broker the service must not replay older runs.
    topics = Topics(
        request=f"bench-{run_id}.saga.request_payment",
        initiated=f"bench-{run_id}.payment.initiated",
        completed=f"bench-{run_id}.payment.completed",
        failed=f"bench-{run_id}.payment.failed",
        dead_letter=f"bench-{run_id}.payment.dead_letter",
    )
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept after a failure, for inspection
        prefix=f"burst-{run_id}-", suffix=".log", delete=False
    )
    try:
        with broker() as kafka, _database(args.postgres, f"bench_{run_id}") as db_url:
            bootstrap = kafka.bootstrap
            port = _free_port()
            env = {
                **os.environ,
                "PAYMENT_DATABASE_URL": db_url,
                "PAYMENT_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                **kafka.service_env(),
                "PAYMENT_HTTP_PORT": str(port),
                "PAYMENT_CONSUMER_GROUP": f"bench-{run_id}",
                "PAYMENT_TOPIC_REQUEST": topics.request,
                "PAYMENT_TOPIC_INITIATED": topics.initiated,
                "PAYMENT_TOPIC_COMPLETED": topics.completed,
                "PAYMENT_TOPIC_FAILED": topics.failed,
                "PAYMENT_TOPIC_DEAD_LETTER": topics.dead_letter,
            }
            migrate = subprocess.run(
                [str(executable), "migrate"], env=env, capture_output=True, text=True, check=False
            )
            if migrate.returncode != 0:
                raise BenchError(f"migrate failed:\n{migrate.stdout}{migrate.stderr}")
            print(f"burst: broker {bootstrap}, database bench_{run_id}, log {log.name}")
            service = subprocess.Popen(
                [str(executable), "run"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                ready_s = _wait_ready(service, port, log)
                print(f"burst: service ready after {ready_s:.1f} s")
                report = asyncio.run(
                    _measure(bootstrap, topics, run_id, args.count, args.timeout, log)
                )
                alive = service.poll() is None
            finally:
                code, stop_s = _stop(service)
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
            print(f"--- service log tail ({log.name}) ---\n{_tail(log)}")
            return 1
        print("burst: OK")
        if args.keep_log:
            print(f"burst: service log kept in {log.name}")
        else:
            Path(log.name).unlink()
        return 0
    except BenchError as exc:
        print(f"burst: {exc}", file=sys.stderr)
        return 1
    finally:
        log.close()


if __name__ == "__main__":
    sys.exit(main())
