"""The embedded broker and PostgreSQL start, serve real clients, and leave no process behind."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from payment.devtools.embedded import (
    EmbeddedBroker,
    EmbeddedError,
    EmbeddedPostgres,
    EmbeddedStartError,
)

# Tansu answers a fetch only when fetch_max_wait_ms expires, and finishes a group join
# after about half the session timeout: small values keep these tests quick.
CONSUMER_SETTINGS = {
    "fetch_max_wait_ms": 5,
    "session_timeout_ms": 2000,
    "heartbeat_interval_ms": 200,
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
}


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie counts as gone (nothing may reap it here)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, found through /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.add(child)
            pending.append(child)
    return found


def wait_gone(pids: set[int], timeout: float = 15.0) -> set[int]:
    """The pids still alive after waiting up to `timeout` for them to exit."""
    deadline = time.monotonic() + timeout
    while (remaining := {pid for pid in pids if alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    return remaining


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as started:
        yield started


@pytest.fixture
async def topic(broker: EmbeddedBroker) -> AsyncIterator[str]:
    name = f"embedded-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=2, replication_factor=1)])
        yield name
    finally:
        await admin.close()


async def consume_one(consumer: AIOKafkaConsumer) -> tuple[TopicPartition, int, bytes]:
    async with asyncio.timeout(20):
        while True:
            batches = await consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                if records:
                    record = records[0]
                    assert record.value is not None
                    return tp, record.offset, record.value


async def test_broker_round_trips_a_message_through_a_consumer_group(
    broker: EmbeddedBroker, topic: str
) -> None:
    servers = broker.bootstrap_servers
    group = f"group-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=servers, enable_idempotence=False)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"first", key=b"k")

        first = AIOKafkaConsumer(
            topic, bootstrap_servers=servers, group_id=group, **CONSUMER_SETTINGS
        )
        await first.start()
        try:
            tp, offset, value = await consume_one(first)
            assert value == b"first"
            await first.commit({tp: offset + 1})
        finally:
            await first.stop()

        await producer.send_and_wait(topic, b"second", key=b"k")
        second = AIOKafkaConsumer(
            topic, bootstrap_servers=servers, group_id=group, **CONSUMER_SETTINGS
        )
        await second.start()
        try:
            assert await second.committed(tp) == offset + 1
            # The committed offset, not auto_offset_reset, decides where it resumes.
            assert await consume_one(second) == (tp, offset + 1, b"second")
        finally:
            await second.stop()
    finally:
        await producer.stop()


def test_broker_stop_leaves_no_process_and_is_idempotent() -> None:
    broker = EmbeddedBroker()
    broker.start()
    pid = broker.pid
    assert pid is not None
    family = {pid} | descendants(pid)

    broker.stop()
    broker.stop()

    assert wait_gone(family, timeout=0.5) == set()
    assert broker.pid is None
    with pytest.raises(EmbeddedError):
        _ = broker.bootstrap_servers


def test_broker_started_from_a_thread_outlives_that_thread() -> None:
    # PR_SET_PDEATHSIG follows the forking thread; a finished worker thread must not
    # take the broker with it.
    broker = EmbeddedBroker()
    starter = threading.Thread(target=broker.start)
    starter.start()
    starter.join()
    try:
        time.sleep(0.3)
        assert broker.pid is not None and alive(broker.pid)
        host, port = broker.bootstrap_servers.split(":")
        socket.create_connection((host, int(port)), timeout=2).close()
    finally:
        broker.stop()


def test_broker_start_failure_shows_the_broker_output() -> None:
    with socket.socket() as occupied:
        occupied.bind(("127.0.0.1", 0))
        occupied.listen()
        broker = EmbeddedBroker(port=occupied.getsockname()[1])
        with pytest.raises(EmbeddedStartError, match="last lines of"):
            broker.start(timeout=10)
    assert broker.pid is None


def test_postgres_keeps_data_across_restarts_and_fresh_wipes_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"
    server = EmbeddedPostgres(data_dir)
    server.start()
    try:
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            conn.execute("CREATE TABLE kept (id int)")
    finally:
        server.stop()

    server.start()
    try:
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT count(*) FROM kept").fetchone() == (0,)
    finally:
        server.stop()

    with EmbeddedPostgres(data_dir, fresh=True) as wiped, psycopg.connect(wiped.url) as conn:
        assert conn.execute("SELECT to_regclass('kept')").fetchone() == (None,)


def test_postgres_creates_the_requested_database(tmp_path: Path) -> None:
    with EmbeddedPostgres(tmp_path / "pgdata", database="payment") as server:
        assert server.url.endswith("/payment")
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("payment",)


def test_postgres_stop_leaves_no_process(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pgdata")
    server.start()
    pid = server.pid
    assert pid is not None
    # A live session gives the postmaster a backend to shut down as well.
    conn = psycopg.connect(server.url, autocommit=True)
    conn.execute("SELECT 1")
    family = {pid} | descendants(pid)
    assert len(family) > 1
    server.stop()
    conn.close()
    server.stop()

    assert wait_gone(family, timeout=5) == set()
    with pytest.raises(EmbeddedError):
        _ = server.url


def test_postgres_start_failure_shows_the_server_output(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pgdata", settings={"max_connections": "many"})
    with pytest.raises(EmbeddedStartError, match="max_connections"):
        server.start()
    assert server.pid is None


def test_fresh_refuses_to_wipe_a_directory_that_is_no_cluster(tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    with pytest.raises(EmbeddedError, match="refusing to wipe"):
        EmbeddedPostgres(tmp_path, fresh=True).start()
    assert precious.read_text() == "keep me"


def test_children_die_with_a_killed_parent(tmp_path: Path) -> None:
    # The parent starts both from a worker thread, like asyncio.to_thread would.
    script = textwrap.dedent(
        f"""
        import sys, threading
        from payment.devtools.embedded import EmbeddedBroker, EmbeddedPostgres
        broker = EmbeddedBroker()
        server = EmbeddedPostgres({str(tmp_path / "pgdata")!r})
        starter = threading.Thread(target=lambda: (broker.start(), server.start()))
        starter.start()
        starter.join()
        print(broker.pid, server.pid, flush=True)
        threading.Event().wait()
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        broker_pid, postmaster_pid = map(int, parent.stdout.readline().split())
        # PostgreSQL's own children come and go (an autovacuum worker, the startup
        # process): the two started must be running; the rest is whatever runs now.
        assert alive(broker_pid) and alive(postmaster_pid)
        family = {broker_pid, postmaster_pid} | descendants(postmaster_pid)
        assert len(family) > 2  # the postmaster's children were found
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()

    assert wait_gone(family) == set()
