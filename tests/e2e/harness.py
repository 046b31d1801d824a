"""End-to-end harness: the real `payment-service` process and an orchestrator talking Kafka.

Reusable by any test that drives the composed service from the outside (e2e, chaos,
outages, several instances):

- `ServiceTopics.unique()`, `create_topics()`: topic names of one test module, created
  up front with one partition count so that every out topic partitions alike.
- `service_env()`: the environment of one `payment-service` process (test-friendly broker
  timings, a free HTTP port, no PAYMENT_* leaking in from the caller's environment).
- `ServiceProcess`: start / wait until ready / SIGTERM / SIGKILL / restart the real
  `payment-service run`, its output appended to a log file (`log_text()`).
- `run_cli()`: one-shot commands (`migrate`, `show`) with their exit code and output.
- `Orchestrator`: sends CloudEvents requests (binary mode, key = booking id) and collects
  everything on the four out topics into an `EventLog` indexed by booking id, payment id
  and `ce_id`; `wait_for()` waits on any condition over that log.

Nothing here imports the service's own codec: the messages are built and read as the
contract (CONTRACT.md sections 1-3) describes them, so a codec bug cannot hide itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code
from aiokafka.partitioner import murmur2

from support.broker import client_fetch_max_wait_ms, idempotent_producer, service_broker_env
from support.database import fresh_database
from support.net import free_port

T = TypeVar("T")

REQUEST_TYPE = "saga.request_payment"
REFUND_TYPE = "saga.refund_payment"
ORCHESTRATOR_SOURCE = "e2e-orchestrator"
SERVICE_SOURCE = "payment-service-e2e"
DEFAULT_PARTITIONS = 3
# RFC 3339 date-time (section 5.6), the profile CloudEvents `time` uses.
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")

Kind = Literal["initiated", "completed", "failed", "dead_letter", "refunded", "refund_failed"]
TERMINAL_KINDS: tuple[Kind, ...] = ("completed", "failed")

_PR_SET_PDEATHSIG = 1


# -- connection security -----------------------------------------------------------------

# The PAYMENT_KAFKA_* security variables of the broker the harness talks to (empty: a
# PLAINTEXT broker). Every service process gets them and the harness's own clients connect
# alike; `use_kafka_security()` is the module-level switch (tests/e2e/conftest.py sets it
# for the whole run when PAYMENT_TEST_KAFKA_SECURITY=sasl_ssl).
_kafka_security: dict[str, str] = {}


def use_kafka_security(env: Mapping[str, str]) -> None:
    """From now on services and harness clients connect with these PAYMENT_KAFKA_* settings."""
    _kafka_security.clear()
    _kafka_security.update(env)


def kafka_security_env() -> dict[str, str]:
    return dict(_kafka_security)


def kafka_client_security() -> dict[str, Any]:
    """aiokafka arguments for the harness's clients, built here from the same variables
    (not by the service's code, so a bug there cannot hide itself)."""
    env = _kafka_security
    protocol = env.get("PAYMENT_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    kwargs: dict[str, Any] = {"security_protocol": protocol}
    if protocol.endswith("SSL"):
        kwargs["ssl_context"] = ssl.create_default_context(
            cafile=env.get("PAYMENT_KAFKA_SSL_CAFILE")
        )
    if protocol.startswith("SASL_"):
        kwargs["sasl_mechanism"] = env["PAYMENT_KAFKA_SASL_MECHANISM"]
        kwargs["sasl_plain_username"] = env["PAYMENT_KAFKA_SASL_USERNAME"]
        kwargs["sasl_plain_password"] = env["PAYMENT_KAFKA_SASL_PASSWORD"]
    return kwargs


# -- topics and environment --------------------------------------------------------------


@dataclass(frozen=True)
class ServiceTopics:
    """The topic names one service (or one group of instances) uses."""

    request: str
    initiated: str
    completed: str
    failed: str
    dead_letter: str
    # Refunds (contract 4.8); empty: the service's defaults, not listened to.
    refund: str = ""
    refunded: str = ""
    refund_failed: str = ""

    @classmethod
    def unique(cls, prefix: str = "e2e") -> ServiceTopics:
        """Fresh names, so tests sharing one broker never see each other's messages."""
        base = f"{prefix}-{uuid.uuid4().hex[:10]}"
        return cls(
            request=f"{base}.saga.request_payment",
            initiated=f"{base}.payment.initiated",
            completed=f"{base}.payment.completed",
            failed=f"{base}.payment.failed",
            dead_letter=f"{base}.payment.dead_letter",
            refund=f"{base}.saga.refund_payment",
            refunded=f"{base}.payment.refunded",
            refund_failed=f"{base}.payment.refund_failed",
        )

    @property
    def refund_topics(self) -> tuple[str, ...]:
        return tuple(t for t in (self.refund, self.refunded, self.refund_failed) if t)

    @property
    def all(self) -> tuple[str, ...]:
        return (
            self.request,
            self.initiated,
            self.completed,
            self.failed,
            self.dead_letter,
            *self.refund_topics,
        )

    @property
    def outbound(self) -> dict[str, Kind]:
        """Each topic the service publishes to, and what it carries."""
        return {
            self.initiated: "initiated",
            self.completed: "completed",
            self.failed: "failed",
            self.dead_letter: "dead_letter",
            **({self.refunded: "refunded"} if self.refunded else {}),
            **({self.refund_failed: "refund_failed"} if self.refund_failed else {}),
        }

    def env(self) -> dict[str, str]:
        refunds = {
            "PAYMENT_TOPIC_REFUND": self.refund,
            "PAYMENT_TOPIC_REFUNDED": self.refunded,
            "PAYMENT_TOPIC_REFUND_FAILED": self.refund_failed,
        }
        return {
            "PAYMENT_TOPIC_REQUEST": self.request,
            "PAYMENT_TOPIC_INITIATED": self.initiated,
            "PAYMENT_TOPIC_COMPLETED": self.completed,
            "PAYMENT_TOPIC_FAILED": self.failed,
            "PAYMENT_TOPIC_DEAD_LETTER": self.dead_letter,
            **{name: topic for name, topic in refunds.items() if topic},
        }


def broker_supports_idempotence() -> bool:
    """Apache Kafka has the idempotent producer; Tansu (the compatibility job) has not."""
    return idempotent_producer()


async def create_topics(
    bootstrap: str,
    topics: Iterable[str],
    partitions: int = DEFAULT_PARTITIONS,
    configs: Mapping[str, Mapping[str, str]] | None = None,
) -> None:
    """Create the topics (all with `partitions` partitions, each with its `configs`, e.g.
    `max.message.bytes`); existing ones are left alone."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="e2e-admin", **kafka_client_security()
    )
    await admin.start()
    try:
        names = list(topics)
        response = await admin.create_topics(
            [
                NewTopic(name, partitions, 1, topic_configs=dict((configs or {}).get(name, {})))
                for name in names
            ],
            timeout_ms=30_000,
        )
        for topic, code, *_ in response.topic_errors:
            if code != 0 and for_code(code) is not TopicAlreadyExistsError:
                raise RuntimeError(f"cannot create topic {topic}: {for_code(code).__name__}")
        # Kafka gives the new partitions their leaders a moment after it answers.
        deadline = time.monotonic() + 30
        while not _all_led(await admin.describe_topics(names)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"topics still without partition leaders: {names}")
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


async def led_partitions(
    bootstrap: str, topics: Sequence[str], timeout_s: float
) -> dict[str, set[int]]:
    """Each topic's partitions, once all exist with a leader (the service may create them)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="e2e-admin", **kafka_client_security()
    )
    await admin.start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            described = await admin.describe_topics(list(topics))
            if _all_led(described):
                return {t["topic"]: {p["partition"] for p in t["partitions"]} for t in described}
            if time.monotonic() >= deadline:
                missing = [t["topic"] for t in described if not _all_led([t])]
                raise TimeoutError(f"topics {missing} do not exist after {timeout_s:g}s")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


def _all_led(described: list[Any]) -> bool:
    return all(
        t["error_code"] == 0
        and t["partitions"]
        and all(p["error_code"] == 0 and p["leader"] >= 0 for p in t["partitions"])
        for t in described
    )


def service_env(
    *,
    database_url: str,
    bootstrap: str,
    topics: ServiceTopics,
    group: str | None = None,
    http_port: int | None = None,
    source: str = SERVICE_SOURCE,
    partitions: int = DEFAULT_PARTITIONS,
    **overrides: str,
) -> dict[str, str]:
    """The environment of one service process.

    Starts from this process's environment without any PAYMENT_* variable (a developer's
    settings must not leak in), then the contract's variables for this test, then the
    test broker timings (plus what Tansu needs, on Tansu), then `overrides` (e.g.
    `PAYMENT_FAKE_MODE="fail"`); an override of "" removes the variable.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYMENT_")}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "PAYMENT_DATABASE_URL": database_url,
            "PAYMENT_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            **service_broker_env(),
            "PAYMENT_KAFKA_SESSION_TIMEOUT_MS": "2000",
            "PAYMENT_KAFKA_HEARTBEAT_INTERVAL_MS": "200",
            "PAYMENT_KAFKA_TOPIC_PARTITIONS": str(partitions),
            "PAYMENT_CONSUMER_GROUP": group or f"e2e-{uuid.uuid4().hex[:10]}",
            "PAYMENT_EVENT_SOURCE": source,
            "PAYMENT_HTTP_HOST": "127.0.0.1",
            "PAYMENT_HTTP_PORT": str(http_port if http_port is not None else free_port()),
            "PAYMENT_PROCESSOR": "fake",
            "PAYMENT_FAKE_MODE": "success",
            # `run` migrates only when told to; the topics are created by `create_topics`.
            "PAYMENT_MIGRATE_ON_START": "true",
            **topics.env(),
            **kafka_security_env(),
        }
    )
    for name, value in overrides.items():
        if value == "":
            env.pop(name, None)
        else:
            env[name] = value
    return env


# -- the service process -----------------------------------------------------------------


def service_command() -> list[str]:
    """`payment-service` of this virtualenv (the console script the package installs)."""
    script = Path(sys.executable).with_name("payment-service")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "payment.cli"]


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn: Linux kills the child if the test run dies without cleaning up."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class ServiceExited(AssertionError):
    """The service process ended while it was expected to run (or to become ready)."""


class ServiceProcess:
    """One real `payment-service` process (by default `run`), its output in `log_path`.

    Every start appends to the same log file, after a marker line, so a restarted
    service keeps one readable history. Signals go to this process only, by pid.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        *,
        args: Sequence[str] = ("run",),
        name: str = "payment-service",
    ) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.args = list(args)
        self.name = name
        self.http_port = int(self.env["PAYMENT_HTTP_PORT"])
        self.starts = 0
        self.exit_codes: list[int] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def __repr__(self) -> str:
        return f"ServiceProcess({self.name}, pid={self.pid}, log={self.log_path})"

    # -- state -----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Self:
        """Launch the process (returns at once; `wait_ready()` waits for readiness)."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
            log.write(f"=== e2e harness: start #{self.starts} of {self.name} at {stamp}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                [*service_command(), *self.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        return self

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until GET /health/ready answers 200; `ServiceExited` if the process ends first."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        async with httpx.AsyncClient(base_url=self.base_url, timeout=2.0) as client:
            while True:
                self._check_alive("while starting")
                try:
                    response = await client.get("/health/ready")
                    if response.status_code == 200:
                        return
                    last = f"{response.status_code}: {response.text.strip()}"
                except httpx.TransportError as exc:
                    last = type(exc).__name__
                if time.monotonic() >= deadline:
                    raise ServiceExited(
                        f"{self.name} not ready after {timeout_s:g}s (last answer {last})\n"
                        f"{self.log_tail()}"
                    )
                await asyncio.sleep(0.05)

    async def start_ready(self, timeout_s: float = 60.0) -> Self:
        """`start()` then `wait_ready()`."""
        self.start()
        await self.wait_ready(timeout_s)
        return self

    def send_signal(self, sig: signal.Signals) -> None:
        if self._process is None:
            raise RuntimeError(f"{self.name} was never started")
        self._process.send_signal(sig)

    async def wait_exit(self, timeout_s: float = 30.0) -> int:
        """The exit code, once the process ended; `TimeoutError` if it did not in time."""
        if self._process is None:
            raise RuntimeError(f"{self.name} was never started")
        deadline = time.monotonic() + timeout_s
        while (code := self._process.poll()) is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.name} (pid {self.pid}) still running after {timeout_s:g}s"
                )
            await asyncio.sleep(0.02)
        if len(self.exit_codes) < self.starts:
            self.exit_codes.append(code)
        return code

    async def terminate(self, timeout_s: float = 45.0) -> int:
        """SIGTERM (graceful: drains in-flight work) and its exit code.

        If it has not exited within `timeout_s` it is killed and `TimeoutError` raised.
        """
        if not self.running:
            return await self.wait_exit(0)
        self.send_signal(signal.SIGTERM)
        try:
            return await self.wait_exit(timeout_s)
        except TimeoutError:
            self.send_signal(signal.SIGKILL)
            await self.wait_exit(10)
            raise

    async def kill(self) -> int:
        """SIGKILL (a crash: nothing drained, nothing flushed) and the exit code (-9)."""
        if self.running:
            self.send_signal(signal.SIGKILL)
        return await self.wait_exit(10)

    async def restart(self, timeout_s: float = 60.0) -> Self:
        """Graceful stop if running, then start and wait until ready."""
        if self.running:
            await self.terminate()
        return await self.start_ready(timeout_s)

    def close(self, timeout_s: float = 45.0) -> None:
        """Synchronous teardown for fixtures: SIGTERM, then SIGKILL if it hangs."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def _check_alive(self, doing: str) -> None:
        if self._process is not None and (code := self._process.poll()) is not None:
            raise ServiceExited(f"{self.name} exited with {code} {doing}\n{self.log_tail()}")

    # -- HTTP ------------------------------------------------------------------------

    async def get(self, path: str, timeout_s: float = 5.0) -> httpx.Response:
        """GET on the service's health and metrics port."""
        async with httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s) as client:
            return await client.get(path)

    # -- output ----------------------------------------------------------------------

    def log_text(self, *, current_start_only: bool = False) -> str:
        """Everything the process wrote so far (all starts, or the current one only)."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            if current_start_only:
                log.seek(self._log_offset)
            return log.read().decode("utf-8", "replace")

    def log_tail(self, lines: int = 60) -> str:
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"--- last lines of {self.log_path} ---\n{tail}"


def run_cli(
    *args: str, env: Mapping[str, str], timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run `payment-service ARGS...` to completion; exit code, stdout and stderr as text."""
    return subprocess.run(
        [*service_command(), *args],
        env=dict(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


# -- what the orchestrator receives ------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One record from an out topic, as consumed; `data` is the decoded JSON value or None."""

    kind: Kind
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    data: Any
    received_at: float

    def header(self, name: str) -> str | None:
        """The first value of a header (case-insensitive name), decoded as UTF-8."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        wanted = name.lower()
        return [
            "" if raw is None else raw.decode("utf-8", "replace")
            for key, raw in self.headers
            if key.lower() == wanted
        ]

    @property
    def ce_id(self) -> str | None:
        return self.header("ce_id")

    @property
    def key_text(self) -> str | None:
        return None if self.key is None else self.key.decode("utf-8", "replace")

    @property
    def booking_id(self) -> str | None:
        """From the data; for a dead letter, whose data may be anything, from the key."""
        if self.kind == "dead_letter":
            return self.key_text
        if isinstance(self.data, dict) and isinstance(self.data.get("booking_id"), str):
            return str(self.data["booking_id"])
        return None

    @property
    def payment_id(self) -> str | None:
        if isinstance(self.data, dict) and isinstance(self.data.get("payment_id"), str):
            return str(self.data["payment_id"])
        return None

    @property
    def reason(self) -> str | None:
        """`reason` of payment.failed, `dlq_reason` of a dead letter."""
        if self.kind == "dead_letter":
            return self.header("dlq_reason")
        if isinstance(self.data, dict) and isinstance(self.data.get("reason"), str):
            return str(self.data["reason"])
        return None

    def describe(self) -> str:
        data = self.value if self.kind == "dead_letter" else self.data
        shown = repr(data)
        if len(shown) > 300:
            shown = shown[:300] + "..."
        return (
            f"{self.kind}@{self.partition}/{self.offset} key={self.key_text!r} "
            f"ce_id={self.ce_id} {shown}"
        )


class EventLog:
    """Everything received, in arrival order, indexed by booking id, payment id and ce_id.

    Dead letters are indexed by their key (the original key: the booking id for a
    request), by their original `ce_id` when they have one, and by where they came from
    (`dlq_original_topic`, `_partition`, `_offset`).
    """

    def __init__(self) -> None:
        self.records: list[Received] = []
        self._by_booking: dict[str, list[Received]] = defaultdict(list)
        self._by_payment: dict[str, list[Received]] = defaultdict(list)
        self._by_ce_id: dict[str, list[Received]] = defaultdict(list)
        self._by_origin: dict[tuple[str, int, int], list[Received]] = defaultdict(list)

    def add(self, record: Received) -> None:
        self.records.append(record)
        if (booking := record.booking_id) is not None:
            self._by_booking[booking].append(record)
        if (payment := record.payment_id) is not None:
            self._by_payment[payment].append(record)
        if (ce_id := record.ce_id) is not None:
            self._by_ce_id[ce_id].append(record)
        if record.kind == "dead_letter":
            topic = record.header("dlq_original_topic")
            partition = record.header("dlq_original_partition")
            offset = record.header("dlq_original_offset")
            with contextlib.suppress(TypeError, ValueError):
                self._by_origin[(str(topic), int(str(partition)), int(str(offset)))].append(record)

    def __len__(self) -> int:
        return len(self.records)

    def for_booking(self, booking_id: str, *kinds: Kind) -> list[Received]:
        """Every delivery about a booking (optionally of these kinds), in arrival order."""
        found = self._by_booking.get(booking_id, [])
        return [r for r in found if not kinds or r.kind in kinds]

    def for_payment(self, payment_id: str, *kinds: Kind) -> list[Received]:
        found = self._by_payment.get(payment_id, [])
        return [r for r in found if not kinds or r.kind in kinds]

    def with_ce_id(self, ce_id: str) -> list[Received]:
        return list(self._by_ce_id.get(ce_id, []))

    def initiated(self, booking_id: str) -> list[Received]:
        return self.for_booking(booking_id, "initiated")

    def terminal(self, booking_id: str) -> list[Received]:
        """payment.completed and payment.failed deliveries of a booking (re-publications too)."""
        return self.for_booking(booking_id, *TERMINAL_KINDS)

    def dead_letters(self, key: str | None = None) -> list[Received]:
        return [
            r
            for r in self.records
            if r.kind == "dead_letter" and (key is None or r.key_text == key)
        ]

    def dead_letter_of(self, sent: Sent) -> Received | None:
        """The dead letter of one sent record, matched on its original topic/partition/offset."""
        found = self._by_origin.get((sent.topic, sent.partition, sent.offset))
        return found[0] if found else None

    @staticmethod
    def distinct(records: Iterable[Received]) -> dict[str, Received]:
        """First delivery of each ce_id (the contract's deduplication), in arrival order."""
        seen: dict[str, Received] = {}
        for record in records:
            if record.ce_id is not None:
                seen.setdefault(record.ce_id, record)
        return seen

    def contains_bytes(self, needle: bytes) -> list[Received]:
        """Records whose key, value or any header name or value contains `needle`."""
        hits = []
        for r in self.records:
            parts = [r.key or b"", r.value or b""]
            for name, raw in r.headers:
                parts += [name.encode(), raw or b""]
            if any(needle in part for part in parts):
                hits.append(r)
        return hits

    def summary(self, booking_id: str | None = None, limit: int = 40) -> str:
        records = self.records if booking_id is None else self.for_booking(booking_id)
        lines = [r.describe() for r in records[-limit:]]
        return "\n".join(lines) or "(nothing received)"


# -- the orchestrator --------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One record the orchestrator produced, and where the broker put it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    booking_id: str | None = None
    ce_id: str | None = None
    data: Mapping[str, Any] | None = field(default=None, compare=False)


def request_data(
    booking_id: str,
    *,
    amount: Any = 1000,
    currency: Any = "EUR",
    payment_method: Any = "pm_card_visa",
    saga_id: str | None = None,
    customer_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """`saga.request_payment` data; None-valued optional fields are left out."""
    data: dict[str, Any] = {
        "booking_id": booking_id,
        "amount": amount,
        "currency": currency,
        "payment_method": payment_method,
        "saga_id": saga_id if saga_id is not None else f"saga-{booking_id}",
    }
    if customer_id is not None:
        data["customer_id"] = customer_id
    data.update(extra)
    return data


def new_traceparent() -> str:
    return f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"


def booking_on_partition(prefix: str, partition: int, partitions: int) -> str:
    """A fresh booking id whose key the default partitioner puts on `partition`."""
    for _ in range(100_000):
        candidate = f"{prefix}-{uuid.uuid4().hex[:10]}"
        if (murmur2(candidate.encode()) & 0x7FFFFFFF) % partitions == partition:
            return candidate
    raise RuntimeError("no booking id found for the partition")  # pragma: no cover


class Orchestrator:
    """The SAGA orchestrator's side of the contract, for tests.

    Listens on the four out topics from their end offsets as of `start()` (manual
    assignment: no group to join), so it sees exactly what was published after it
    started. Use as `async with Orchestrator(...) as orch:`.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: ServiceTopics,
        *,
        source: str = ORCHESTRATOR_SOURCE,
        diagnostics: Callable[[], str] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.source = source
        self.events = EventLog()
        # Called when a wait times out, e.g. `lambda: service.log_tail()`.
        self.diagnostics = diagnostics
        self.partitions: dict[str, int] = {}
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._collector: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self, timeout_s: float = 30.0) -> None:
        """Connect, and listen on every partition of the out topics (which must exist)."""
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=f"{self.source}-producer",
            acks="all",
            enable_idempotence=broker_supports_idempotence(),
            linger_ms=0,
            **kafka_client_security(),
        )
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=client_fetch_max_wait_ms(),
            client_id=f"{self.source}-consumer",
            **kafka_client_security(),
        )
        await self._consumer.start()
        found = await led_partitions(self.bootstrap, self.topics.all, timeout_s)
        self.partitions = {t: len(p) for t, p in found.items()}
        assigned = [
            TopicPartition(topic, p) for topic in self.topics.outbound for p in sorted(found[topic])
        ]
        self._consumer.assign(assigned)
        for tp, offset in (await self._consumer.end_offsets(assigned)).items():
            self._consumer.seek(tp, offset)
        self._collector = asyncio.create_task(self._collect(), name="e2e-orchestrator-collector")

    async def stop(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
            self._collector = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def _collect(self) -> None:
        assert self._consumer is not None
        outbound = self.topics.outbound
        while True:
            batch = await self._consumer.getmany(timeout_ms=100)
            if not batch:
                continue
            now = time.monotonic()
            for records in batch.values():
                for record in records:
                    kind = outbound[record.topic]
                    data: Any = None
                    if kind != "dead_letter" and record.value is not None:
                        with contextlib.suppress(ValueError):
                            data = json.loads(record.value)
                    self.events.add(
                        Received(
                            kind=kind,
                            topic=record.topic,
                            partition=record.partition,
                            offset=record.offset,
                            key=record.key,
                            value=record.value,
                            headers=tuple(record.headers or ()),
                            data=data,
                            received_at=now,
                        )
                    )
            async with self._changed:
                self._changed.notify_all()

    # -- sending ---------------------------------------------------------------------

    def headers(
        self,
        *,
        ce_id: str | None = None,
        source: str | None = None,
        ce_type: str = REQUEST_TYPE,
        traceparent: str | None = None,
        omit: Iterable[str] = (),
        extra: Iterable[tuple[str, bytes]] = (),
    ) -> list[tuple[str, bytes]]:
        """CloudEvents binary-mode headers of a request (contract section 2)."""
        values = {
            "ce_specversion": "1.0",
            "ce_id": ce_id or str(uuid.uuid4()),
            "ce_source": source or self.source,
            "ce_type": ce_type,
            "ce_time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "content-type": "application/json",
        }
        if traceparent is not None:
            values["traceparent"] = traceparent
        skipped = set(omit)
        headers = [(k, v.encode()) for k, v in values.items() if k not in skipped]
        return headers + list(extra)

    async def send_raw(
        self,
        value: bytes | None,
        *,
        key: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        topic: str | None = None,
    ) -> Sent:
        """Produce any record (poison included) on the request topic; acked when it returns."""
        assert self._producer is not None, "start() first"
        target = topic or self.topics.request
        meta = await self._producer.send_and_wait(
            target, value=value, key=key, headers=list(headers)
        )
        ce_id = next((v.decode() for k, v in headers if k == "ce_id"), None)
        return Sent(
            topic=target,
            partition=meta.partition,
            offset=meta.offset,
            key=key,
            value=value,
            headers=tuple(headers),
            booking_id=None if key is None else key.decode("utf-8", "replace"),
            ce_id=ce_id,
        )

    async def request(
        self,
        booking_id: str,
        *,
        data: Mapping[str, Any] | None = None,
        ce_id: str | None = None,
        traceparent: str | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
        **fields: Any,
    ) -> Sent:
        """A `saga.request_payment` for a booking, key = booking id.

        `data` replaces the whole JSON body; otherwise `fields` adjust `request_data()`.
        """
        body = dict(data) if data is not None else request_data(booking_id, **fields)
        sent = await self.send_raw(
            json.dumps(body).encode(),
            key=booking_id.encode(),
            headers=headers or self.headers(ce_id=ce_id, traceparent=traceparent),
        )
        return dataclasses.replace(sent, booking_id=booking_id, data=body)

    async def refund(
        self,
        booking_id: str,
        *,
        amount: int | None = None,
        ce_id: str | None = None,
        traceparent: str | None = None,
        **fields: Any,
    ) -> Sent:
        """A `saga.refund_payment` for a booking (all that is refundable unless `amount`),
        key = booking id, on the refund topic."""
        assert self.topics.refund, "these topics have no refund topic"
        body: dict[str, Any] = {"booking_id": booking_id, "saga_id": f"saga-{booking_id}"}
        if amount is not None:
            body["amount"] = amount
        body.update(fields)
        sent = await self.send_raw(
            json.dumps(body).encode(),
            key=booking_id.encode(),
            headers=self.headers(ce_id=ce_id, ce_type=REFUND_TYPE, traceparent=traceparent),
            topic=self.topics.refund,
        )
        return dataclasses.replace(sent, booking_id=booking_id, data=body)

    def refund_outcomes(self, booking_id: str) -> list[Received]:
        """payment.refunded and payment.refund_failed deliveries of a booking."""
        return self.events.for_booking(booking_id, "refunded", "refund_failed")

    async def wait_refund_outcomes(
        self, booking_id: str, count: int, *, timeout_s: float = 30.0
    ) -> list[Received]:
        """Once `count` refund outcomes of the booking arrived: all of them."""
        return await self.wait_for(
            lambda log: (found := self.refund_outcomes(booking_id))[count - 1 :] and found,
            timeout_s=timeout_s,
            what=f"{count} refund outcomes of {booking_id}",
        )

    async def redeliver(self, sent: Sent) -> Sent:
        """The same record again (same key, value and headers): what a redelivery looks like."""
        again = await self.send_raw(
            sent.value, key=sent.key, headers=sent.headers, topic=sent.topic
        )
        return dataclasses.replace(again, booking_id=sent.booking_id, data=sent.data)

    # -- waiting ---------------------------------------------------------------------

    async def wait_for(
        self,
        condition: Callable[[EventLog], T | None],
        *,
        timeout_s: float = 30.0,
        what: str = "condition",
    ) -> T:
        """Wait until `condition(self.events)` is truthy and return its value."""

        def check() -> T | None:
            if self._collector is not None and self._collector.done():
                self._collector.result()  # a dead collector would make us wait forever
                raise RuntimeError("the orchestrator's collector stopped")
            return condition(self.events)

        async with self._changed:
            try:
                async with asyncio.timeout(timeout_s):
                    while not (result := check()):
                        await self._changed.wait()
            except TimeoutError:
                extra = f"\n{self.diagnostics()}" if self.diagnostics else ""
                raise AssertionError(
                    f"timed out after {timeout_s:g}s waiting for {what}; received so far:\n"
                    f"{self.events.summary()}{extra}"
                ) from None
        return result

    async def wait_outcome(
        self, booking_id: str, *, deliveries: int = 1, timeout_s: float = 30.0
    ) -> Received:
        """The booking's terminal event, once `deliveries` of them arrived (the last one)."""

        def outcome(log: EventLog) -> Received | None:
            found = log.terminal(booking_id)
            return found[deliveries - 1] if len(found) >= deliveries else None

        return await self.wait_for(
            outcome, timeout_s=timeout_s, what=f"terminal event #{deliveries} of {booking_id}"
        )

    async def wait_all_terminal(self, bookings: Iterable[str], *, timeout_s: float) -> None:
        """Until every booking has a terminal event."""
        wanted = list(bookings)
        await self.wait_for(
            lambda log: all(log.terminal(b) for b in wanted),
            timeout_s=timeout_s,
            what="an outcome for every booking",
        )

    async def wait_dead_letter(self, sent: Sent, *, timeout_s: float = 30.0) -> Received:
        """The dead letter of a sent record."""
        return await self.wait_for(
            lambda log: log.dead_letter_of(sent),
            timeout_s=timeout_s,
            what=f"the dead letter of {sent.topic}[{sent.partition}]@{sent.offset}",
        )

    async def sentinel(self, after: Sent, *, timeout_s: float = 30.0) -> Received:
        """A valid request on the partition of `after`, sent now; returns its outcome.

        The service fetches a partition in order, so once the sentinel's outcome is in,
        `after` was handled long ago: a way to wait for "nothing happens" without a sleep.
        """
        partitions = self.partitions[after.topic]
        booking = booking_on_partition("sentinel", after.partition, partitions)
        sent = await self.request(booking)
        assert sent.partition == after.partition, "the partitioner prediction was wrong"
        return await self.wait_outcome(booking, timeout_s=timeout_s)

    async def settle(self, *, timeout_s: float = 30.0) -> list[Received]:
        """A sentinel on every partition of the request topic: everything sent before it
        has been handled once this returns."""
        partitions = self.partitions[self.topics.request]
        bookings = [booking_on_partition("settle", p, partitions) for p in range(partitions)]
        await asyncio.gather(*(self.request(b) for b in bookings))
        return [await self.wait_outcome(b, timeout_s=timeout_s) for b in bookings]


# -- a whole deployment ------------------------------------------------------------------

StackFactory = Callable[..., Awaitable["ServiceStack"]]


@dataclass
class ServiceStack:
    """One deployment under test: a database, topics, a consumer group, its processes and
    an orchestrator listening to what they publish.

    `add_service()` adds another instance of the same deployment (same database, topics
    and group, its own HTTP port and log), for multi-instance and rebalance tests.
    """

    bootstrap: str
    database_url: str
    topics: ServiceTopics
    group: str
    log_dir: Path
    partitions: int = DEFAULT_PARTITIONS
    overrides: dict[str, str] = field(default_factory=dict)
    services: list[ServiceProcess] = field(default_factory=list)
    orchestrator: Orchestrator | None = None

    @property
    def service(self) -> ServiceProcess:
        """The first instance."""
        return self.services[0]

    @property
    def orch(self) -> Orchestrator:
        assert self.orchestrator is not None, "the stack is not open"
        return self.orchestrator

    @property
    def source(self) -> str:
        """The outbound `ce_source` the services are configured with."""
        return self.overrides.get("PAYMENT_EVENT_SOURCE", SERVICE_SOURCE)

    def env(self, **overrides: str) -> dict[str, str]:
        """The environment of an instance (or of a CLI command) of this deployment."""
        return service_env(
            database_url=self.database_url,
            bootstrap=self.bootstrap,
            topics=self.topics,
            group=self.group,
            partitions=self.partitions,
            **{**self.overrides, **overrides},
        )

    def add_service(self, name: str | None = None, **overrides: str) -> ServiceProcess:
        """A new, not yet started instance."""
        name = name or f"service-{len(self.services) + 1}"
        process = ServiceProcess(self.env(**overrides), self.log_dir / f"{name}.log", name=name)
        self.services.append(process)
        return process

    def diagnostics(self) -> str:
        return "\n".join(s.log_tail(40) for s in self.services)

    def close(self) -> None:
        for service in self.services:
            service.close()


@contextlib.asynccontextmanager
async def open_stack(
    *,
    bootstrap: str,
    database_url: str,
    log_dir: Path,
    instances: int = 1,
    partitions: int = DEFAULT_PARTITIONS,
    topic_prefix: str = "e2e",
    inbound_max_message_bytes: int | None = None,
    **overrides: str,
) -> AsyncIterator[ServiceStack]:
    """Topics created, the orchestrator listening, `instances` services started and ready.

    `inbound_max_message_bytes` raises the two inbound topics' `max.message.bytes` (Kafka
    refuses a record over about 1 MiB by default), for tests of very large records.

    Yields a `ServiceStack`; on exit the orchestrator stops and every instance still
    running gets SIGTERM (SIGKILL if it hangs). `overrides` are PAYMENT_* variables for
    every instance (e.g. `PAYMENT_FAKE_MODE="fail"`).
    """
    topics = ServiceTopics.unique(topic_prefix)
    stack = ServiceStack(
        bootstrap=bootstrap,
        database_url=database_url,
        topics=topics,
        group=f"{topic_prefix}-group-{uuid.uuid4().hex[:8]}",
        log_dir=log_dir / topics.request.split(".", 1)[0],
        partitions=partitions,
        overrides={"PAYMENT_EVENT_SOURCE": SERVICE_SOURCE, **overrides},
    )
    configs = {}
    if inbound_max_message_bytes is not None:
        limit = {"max.message.bytes": str(inbound_max_message_bytes)}
        configs = {topics.request: limit, topics.initiated: limit}
    await create_topics(bootstrap, topics.all, partitions, configs)
    try:
        stack.orchestrator = Orchestrator(bootstrap, topics, diagnostics=stack.diagnostics)
        await stack.orchestrator.start()
        for _ in range(instances):
            stack.add_service().start()
        await asyncio.gather(*(s.wait_ready() for s in stack.services))
        yield stack
    finally:
        if stack.orchestrator is not None:
            await stack.orchestrator.stop()
        await asyncio.to_thread(stack.close)


@contextlib.asynccontextmanager
async def open_stack_on_a_fresh_database(
    server_url: str, **stack_options: Any
) -> AsyncIterator[ServiceStack]:
    """`open_stack` on a database of its own, dropped afterwards (a module's second or
    third service, beside the one on the module's database)."""
    with fresh_database(server_url, prefix="payment_e2e") as url:
        async with open_stack(database_url=url, **stack_options) as opened:
            yield opened


def new_booking(prefix: str) -> str:
    """A booking id no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
