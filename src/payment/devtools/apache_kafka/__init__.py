"""A local Apache Kafka broker (one KRaft node) as a child process: tests, benchmarks, dev."""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import fcntl
import hashlib
import importlib.resources
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

import platformdirs

from payment.devtools.child_process import (
    LOOPBACK,
    ChildProcess,
    EmbeddedExtraMissing,
    EmbeddedStartError,
    SupervisedProcess,
    free_port,
)
from payment.devtools.embedded_broker import kafka_api_versions_answers

__all__ = [
    "KAFKA_VERSION",
    "ApacheKafkaBroker",
    "JavaToolMissing",
    "kafka_libs",
]

_POM: Final = importlib.resources.files(__package__).joinpath("pom.xml").read_bytes()
KAFKA_VERSION: Final = re.search(rb"<kafka.version>([^<]+)<", _POM).group(1).decode()  # type: ignore[union-attr]
# Where the resolved jars are kept between runs (a fresh machine resolves them once).
CACHE_ENV_VAR: Final = "PAYMENT_KAFKA_CACHE_DIR"
_PROBE_TOPIC: Final = "__payment_service_probe"

# A one-node cluster: internal topics cannot have more than one replica. The group
# settings let tests rebalance in seconds (the broker's own defaults: 3 s initial delay,
# 6 s minimum session timeout); nothing here changes what a client may rely on.
_BROKER_DEFAULTS: Final[Mapping[str, str]] = {
    "process.roles": "broker,controller",
    "node.id": "1",
    "controller.listener.names": "CONTROLLER",
    "inter.broker.listener.name": "PLAINTEXT",
    "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
    "offsets.topic.replication.factor": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "group.initial.rebalance.delay.ms": "0",
    # As production clusters are usually run: a topic exists because someone created it.
    "auto.create.topics.enable": "false",
    "group.min.session.timeout.ms": "1000",
}

_LOG4J2: Final = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = OUT
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = info
"""

_JVM_OPTIONS: Final = (
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)


class JavaToolMissing(EmbeddedExtraMissing):
    """`java` (to run the broker) or `mvn` (to resolve its jars once) is not installed."""


def _cache_root() -> Path:
    configured = os.environ.get(CACHE_ENV_VAR, "").strip()
    base = Path(configured) if configured else Path(platformdirs.user_cache_dir("payment-service"))
    digest = hashlib.sha256(_POM).hexdigest()[:12]
    return base / "apache-kafka" / f"{KAFKA_VERSION}-{digest}"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def kafka_libs(timeout: float = 900.0) -> Path:
    """The folder of the pinned broker's jars, resolved with Maven on first use.

    Safe to call from several processes at once: one resolves, the others wait for it.
    """
    root = _cache_root()
    libs = root / "libs"
    complete = root / ".complete"
    if complete.exists():
        return libs
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / ".lock"):
        if complete.exists():
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise JavaToolMissing(
                f"Apache Kafka {KAFKA_VERSION} is resolved from Maven Central with `mvn`, "
                "which is not installed (Debian: apt-get install maven)"
            )
        (root / "pom.xml").write_bytes(_POM)
        partial = root / "libs.partial"
        shutil.rmtree(partial, ignore_errors=True)
        done = subprocess.run(
            [
                mvn,
                "--batch-mode",
                "--quiet",
                "--file",
                str(root / "pom.xml"),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={partial}",
                "-DincludeScope=runtime",
            ],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).decode("utf-8", "replace")[-2000:]
            raise EmbeddedStartError(
                f"mvn could not resolve Apache Kafka {KAFKA_VERSION} "
                f"(exit {done.returncode}):\n{tail}"
            )
        shutil.rmtree(libs, ignore_errors=True)
        partial.rename(libs)
        complete.write_text(f"Apache Kafka {KAFKA_VERSION}\n")
    return libs


def _cluster_id() -> str:
    # What `kafka-storage random-uuid` prints: 16 random bytes, URL-safe base64, no padding.
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _properties_text(properties: Mapping[str, str]) -> str:
    return "".join(f"{key}={value}\n" for key, value in properties.items())


async def _serves(bootstrap: str) -> None:
    """Raise unless the broker takes an idempotent, acks=all write and a group commit."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic(_PROBE_TOPIC, 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", request_timeout_ms=5000
    )
    await producer.start()
    try:
        sent = await producer.send_and_wait(_PROBE_TOPIC, b"probe")
    finally:
        await producer.stop()
    # The first group of a cluster creates __consumer_offsets: done here, not in a test.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id="payment-service-probe", enable_auto_commit=False
    )
    await consumer.start()
    try:
        partition = TopicPartition(_PROBE_TOPIC, sent.partition)
        consumer.assign([partition])
        await consumer.commit({partition: sent.offset + 1})
    finally:
        await consumer.stop()


def _probe(bootstrap: str, timeout: float) -> bool:
    """Run `_serves` in a thread of its own (the caller may be inside an event loop)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            asyncio.run(asyncio.wait_for(_serves(bootstrap), timeout))
            outcome.append(None)
        except Exception as exc:  # not ready yet: the caller polls again
            outcome.append(exc)

    thread = threading.Thread(target=run, name="kafka-readiness-probe", daemon=True)
    thread.start()
    thread.join(timeout + 5)
    return bool(outcome) and outcome[0] is None


class ApacheKafkaBroker(SupervisedProcess):
    """One KRaft node (combined broker and controller) on loopback, as a child process.

    Its log directory survives `stop()` and `kill()`, so `start()` again is a restart
    with every record kept; `close()` removes a directory it created itself.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = LOOPBACK,
        data_dir: Path | None = None,
        properties: Mapping[str, str] | None = None,
        heap_mb: int = 768,
        extra_listeners: Mapping[str, str] | None = None,
        format_options: Sequence[str] = (),
    ) -> None:
        """`extra_listeners` adds listeners beside PLAINTEXT (which the readiness probe and
        the brokers' own traffic keep using): name -> `PROTOCOL://advertised_host:port`,
        bound on `host`; their settings go in `properties` (`listener.name.<name>.…`).
        `format_options` are passed to `StorageTool format`, e.g. `--add-scram` credentials.
        """
        self._host = host
        self._port = port
        self._controller_port: int | None = None
        self._owns_dir = data_dir is None
        self._dir = data_dir
        self._properties = dict(properties or {})
        self._heap_mb = heap_mb
        self._extra_listeners = dict(extra_listeners or {})
        self._format_options = tuple(format_options)
        self._child = ChildProcess(f"Apache Kafka {KAFKA_VERSION}")
        self.started_in_s: float | None = None

    @property
    def version(self) -> str:
        return KAFKA_VERSION

    @property
    def bootstrap_servers(self) -> str:
        """`host:port` of the running broker."""
        return self._address("the Apache Kafka broker")

    def start(self, timeout: float = 120.0) -> None:
        """Start (or restart) the broker; return once it serves writes and groups."""
        if self._child.running:
            return
        java = shutil.which("java")
        if java is None:
            raise JavaToolMissing(
                f"Apache Kafka {KAFKA_VERSION} needs `java` 17 or later "
                "(Debian: apt-get install openjdk-17-jre-headless)"
            )
        began = time.monotonic()
        libs = kafka_libs()
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="payment-kafka-"))
        self._port = self._port or free_port(self._host)
        self._controller_port = self._controller_port or free_port(self._host)
        config = self._write_config()
        classpath = f"{libs}/*"
        jvm = [java, "-Xms256m", f"-Xmx{self._heap_mb}m", *_JVM_OPTIONS]
        jvm.append(f"-Dlog4j2.configurationFile={self._dir / 'log4j2.properties'}")
        if not (self._dir / "logs" / "meta.properties").exists():
            self._format(jvm, classpath, config)
        self._child.launch(
            [*jvm, "-cp", classpath, "kafka.Kafka", str(config)],
            death_signal=signal.SIGKILL,
            cwd=self._dir,
        )
        atexit.register(self.close)
        bootstrap = f"{self._host}:{self._port}"
        self._wait_started(
            lambda: kafka_api_versions_answers(self._host, self._port or 0),
            timeout,
            f"answer Kafka requests on {bootstrap}",
        )
        self._wait_started(
            lambda: _probe(bootstrap, 10.0),
            max(5.0, timeout - (time.monotonic() - began)),
            f"serve writes and consumer groups on {bootstrap}",
        )
        self.started_in_s = time.monotonic() - began

    def _write_config(self) -> Path:
        assert self._dir is not None
        listeners = [
            f"PLAINTEXT://{self._host}:{self._port}",
            f"CONTROLLER://{self._host}:{self._controller_port}",
        ]
        advertised = [f"PLAINTEXT://{self._host}:{self._port}"]
        protocols = [_BROKER_DEFAULTS["listener.security.protocol.map"]]
        for name, url in self._extra_listeners.items():
            protocol, _, address = url.partition("://")
            port = address.rpartition(":")[2]
            listeners.append(f"{name}://{self._host}:{port}")
            advertised.append(f"{name}://{address}")
            protocols.append(f"{name}:{protocol}")
        properties = {
            **_BROKER_DEFAULTS,
            "controller.quorum.voters": f"1@{self._host}:{self._controller_port}",
            "listeners": ",".join(listeners),
            "advertised.listeners": ",".join(advertised),
            "listener.security.protocol.map": ",".join(protocols),
            "log.dirs": str(self._dir / "logs"),
            **self._properties,
        }
        config = self._dir / "server.properties"
        config.write_text(_properties_text(properties))
        (self._dir / "log4j2.properties").write_text(_LOG4J2)
        return config

    def _format(self, jvm: list[str], classpath: str, config: Path) -> None:
        done = subprocess.run(
            [
                *jvm,
                *("-cp", classpath, "kafka.tools.StorageTool", "format"),
                # "=": a random id may begin with "-", which would read as an option.
                f"--cluster-id={_cluster_id()}",
                *("--config", str(config)),
                *self._format_options,
            ],
            capture_output=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).decode("utf-8", "replace")[-2000:]
            raise EmbeddedStartError(
                f"kafka-storage format failed (exit {done.returncode}):\n{tail}"
            )

    def stop(self, timeout: float = 30.0) -> None:
        """A clean shutdown (SIGTERM); the log directory is kept for a restart."""
        self._child.stop(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL, as a crashed host would: what the OS had was written is kept."""
        self._child.stop(signal.SIGKILL, 10.0)

    def _abandon(self) -> None:
        self.kill()

    def close(self) -> None:
        """Stop the broker and remove the log directory if this object made it."""
        self.stop()
        atexit.unregister(self.close)
        if self._owns_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
