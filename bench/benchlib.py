"""Shared plumbing of the bench scripts: scratch databases, the broker, the service, sampling.

Not a test helper: every function here starts something real and cleans it up.
"""

from __future__ import annotations

import contextlib
import math
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from payment.adapters.kafka.topics import Topics
from payment.devtools.apache_kafka import KAFKA_VERSION

POSTGRES_ENV_VAR = "PAYMENT_BENCH_POSTGRES_URL"
BROKER_ENV_VAR = "PAYMENT_BENCH_BROKER"
# Tansu answers a fetch only when its wait expires: a short wait is a short hop.
TANSU_FETCH_WAIT_MS = 5
KAFKA_ENV_VAR = "PAYMENT_TEST_KAFKA_BOOTSTRAP_SERVERS"
DEFAULT_POSTGRES = "postgresql://root@127.0.0.1:5432/postgres"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class BenchError(Exception):
    """The bench could not set up, or a component misbehaved outside the measurement."""


def server_url() -> str:
    """The PostgreSQL server URL of a role that may create databases."""
    return os.environ.get(POSTGRES_ENV_VAR, DEFAULT_POSTGRES)


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@contextlib.contextmanager
def scratch_database(server: str, prefix: str) -> Iterator[tuple[str, str]]:
    """A fresh database on `server`: yields (name, url); dropped (FORCE) afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name, with_database(server, name)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@dataclass(frozen=True)
class Broker:
    """The bench's broker: where it listens, its process (for CPU figures), its kind."""

    bootstrap: str
    pid: int | None
    kind: str  # "kafka" or "tansu"

    @property
    def label(self) -> str:
        return f"Apache Kafka {KAFKA_VERSION}" if self.kind == "kafka" else "Tansu"

    def service_env(self, fetch_wait_ms: int | None = None) -> dict[str, str]:
        """What `payment-service run` needs beyond its defaults here: the fake processor,
        topics created on this single broker; on Tansu what it lacks."""
        env: dict[str, str] = {
            "PAYMENT_PROCESSOR": "fake",
            "PAYMENT_KAFKA_CREATE_TOPICS": "true",
            "PAYMENT_KAFKA_REPLICATION_FACTOR": "1",
            "PAYMENT_KAFKA_MIN_INSYNC_REPLICAS": "1",
        }
        if self.kind == "tansu":
            # No idempotent producer; a fetch is answered only when its wait expires.
            env["PAYMENT_KAFKA_ENABLE_IDEMPOTENCE"] = "false"
            fetch_wait_ms = fetch_wait_ms or TANSU_FETCH_WAIT_MS
        if fetch_wait_ms is not None:
            env["PAYMENT_KAFKA_FETCH_MAX_WAIT_MS"] = str(fetch_wait_ms)
        return env

    def client_fetch_wait_ms(self, fetch_wait_ms: int | None = None) -> int:
        """The bench's own consumers' fetch wait."""
        if fetch_wait_ms is not None:
            return fetch_wait_ms
        return TANSU_FETCH_WAIT_MS if self.kind == "tansu" else 500


@contextlib.contextmanager
def broker(kind: str | None = None) -> Iterator[Broker]:
    """The broker of a bench run: `$PAYMENT_TEST_KAFKA_BOOTSTRAP_SERVERS` if set, else one
    started here and stopped afterwards — Apache Kafka (default) or, with `kind="tansu"`
    or `$PAYMENT_BENCH_BROKER=tansu`, the embedded Tansu of `payment-service dev`."""
    kind = (kind or os.environ.get(BROKER_ENV_VAR, "") or "kafka").strip().lower()
    if kind not in ("kafka", "tansu"):
        raise BenchError(f"unknown broker {kind!r}: kafka or tansu")
    configured = os.environ.get(KAFKA_ENV_VAR, "").strip()
    if configured:
        yield Broker(configured, None, kind)
        return
    if kind == "tansu":
        from payment.devtools.embedded import EmbeddedBroker

        with EmbeddedBroker() as tansu:
            yield Broker(tansu.bootstrap_servers, tansu.pid, kind)
        return
    from payment.devtools.apache_kafka import ApacheKafkaBroker

    with ApacheKafkaBroker(heap_mb=1024) as kafka:
        print(
            f"bench: Apache Kafka {kafka.version} on {kafka.bootstrap_servers} "
            f"(ready in {kafka.started_in_s or 0:.1f} s)",
            flush=True,
        )
        yield Broker(kafka.bootstrap_servers, kafka.pid, kind)


# The topics a bench run names for itself (the refund topics it never uses keep theirs).
RUN_TOPICS = ("request", "initiated", "completed", "failed", "dead_letter")


def run_topics(run_id: str) -> Topics:
    """The contract's names of RUN_TOPICS under the run's prefix: on a shared broker the
    service must not replay older runs."""
    contract = Topics()
    return Topics(**{name: f"bench-{run_id}.{getattr(contract, name)}" for name in RUN_TOPICS})


def run_env(run_id: str, topics: Topics) -> dict[str, str]:
    """The service settings naming a run's own consumer group and topics."""
    return {
        "PAYMENT_CONSUMER_GROUP": f"bench-{run_id}",
        **{f"PAYMENT_TOPIC_{name.upper()}": getattr(topics, name) for name in RUN_TOPICS},
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def executable() -> str:
    return str(Path(sys.executable).parent / "payment-service")


def tail(path: str, lines: int = 40) -> str:
    text = Path(path).read_bytes()[-16_384:].decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


class Service:
    """`payment-service run` as a child process, its log in a temporary file."""

    def __init__(self, env: Mapping[str, str], name: str) -> None:
        self.env = dict(env)
        self.port = int(self.env["PAYMENT_HTTP_PORT"])
        self.log: IO[bytes] = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept on failure
            prefix=f"{name}-", suffix=".log", delete=False
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def migrate(self) -> None:
        done = subprocess.run(
            [executable(), "migrate"], env=self.env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise BenchError(f"migrate failed:\n{done.stdout}{done.stderr}")

    def start(self) -> float:
        """Start `run` and wait for /health/ready; seconds it took."""
        self.process = subprocess.Popen(
            [executable(), "run"],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        started = time.monotonic()
        url = f"http://127.0.0.1:{self.port}/health/ready"
        while time.monotonic() - started < READY_TIMEOUT_S:
            if self.process.poll() is not None:
                raise BenchError(
                    f"payment-service run exited with {self.process.returncode}:\n"
                    + tail(self.log.name)
                )
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(url, timeout=1) as response,
            ):
                if response.status == 200:
                    return time.monotonic() - started
            time.sleep(0.1)
        raise BenchError("payment-service run not ready in time:\n" + tail(self.log.name))

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.exit_code = self.process.returncode
        return self.exit_code

    def discard_log(self) -> None:
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


# -- process figures -------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (psutil, else /proc/<pid>/stat)."""
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def cpu_by_pid(pids: Sequence[int]) -> dict[int, float]:
    """CPU seconds of each process still alive (a pooled connection's backend may end)."""
    found: dict[int, float] = {}
    for pid in pids:
        try:
            found[pid] = cpu_seconds(pid)
        except Exception:  # gone meanwhile (psutil.NoSuchProcess, OSError, …)
            continue
    return found


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU used between two readings: processes alive at both, plus those born since.

    A process that ended in between is left out (its last seconds are not known).
    """
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def runqueue_wait_s(pid: int) -> float:
    """Seconds the process's threads spent runnable but waiting for a CPU (schedstat).

    On a shared machine this tells CPU starvation (other processes had the cores) from a
    process that was idle, waiting on I/O.
    """
    total = 0.0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(stat.read_text().split()[1]) / 1e9
    return total


def peak_rss_mb(pid: int) -> float:
    """The process's resident-set high-water mark (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmHWM for pid {pid}")


def backend_pids(server: str, database: str) -> list[int]:
    """PostgreSQL backend processes connected to `database` (the service's pool, say)."""
    with psycopg.connect(server, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,)
        ).fetchall()
    return [int(pid) for (pid,) in rows]


def database_counters(server: str, database: str) -> tuple[int, int]:
    """(transactions committed or rolled back in `database`, the server's WAL position).

    The WAL position is the whole server's: other databases' writes count too.
    """
    with psycopg.connect(server, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint"
            " FROM pg_stat_database WHERE datname = %s",
            (database,),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def steal_seconds() -> float:
    """CPU time the hypervisor gave other guests while this VM's CPUs wanted it, summed
    over the CPUs, since boot (/proc/stat's `steal`; 0 where the kernel does not count
    it). A step with much of it measured a slower machine, whatever the code did."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu "):
                return int(line.split()[8]) / os.sysconf("SC_CLK_TCK")
    return 0.0


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A plain Markdown table (fits a terminal and docs/performance.md alike)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])
