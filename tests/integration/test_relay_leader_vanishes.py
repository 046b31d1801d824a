"""A relay leader whose host vanishes (issue 14, item 3): a standby leads within 60 s.

Not a SIGKILL: a killed process's kernel still closes its connections, and PostgreSQL
frees the lock at once. Here the leader runs in a network namespace of its own, linked
to this one by a veth pair, and the test takes its side of the link down: no FIN, no RST,
nothing more reaches PostgreSQL from it, as when a host loses power or its network.
Without bounds on the lock's session, PostgreSQL would keep the lock for the kernel's
keepalive time (about two hours) and nobody would publish.

PostgreSQL is a private one (tests/support, embedded binaries) listening on this side's
veth address, so the session really is TCP between the two namespaces. The leader is
the real candidate code (`RelayLeadership`, production defaults) in a child process; the
standby is a `KafkaOutboxRelay` here, with the same leadership and a real producer on the
test broker: it must publish the row waiting in the outbox. The leader must notice its own
loss too (its heartbeat fails) rather than believe it still leads.

Needs root and `ip netns` (Linux network namespaces); skipped otherwise.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_asyncio

from payment.adapters.kafka.producer import create_producer
from payment.adapters.kafka.relay import KafkaOutboxRelay
from payment.adapters.kafka.topics import Topics, ensure_topics
from payment.adapters.postgres.migrations import migrate
from payment.adapters.postgres.pool import open_pool
from payment.adapters.postgres.relay_lock import DEAD_AFTER_S, RelayLeadership
from payment.adapters.postgres.unit_of_work import PostgresUnitOfWorkFactory
from payment.application.commands import TraceHeaders
from payment.application.messages import OutboundMessage
from payment.devtools.embedded import EmbeddedExtraMissing, EmbeddedPostgres
from support.broker import idempotent_producer
from support.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

NEW_LEADER_WITHIN_S = 60.0

_LEADER = """
import asyncio, sys
from payment.adapters.postgres.relay_lock import RelayLeadership, RelayLeadershipLost

async def main() -> None:
    try:
        async with RelayLeadership(sys.argv[1])():
            print("leading", flush=True)
            await asyncio.sleep(3600)
    except RelayLeadershipLost as exc:
        print(f"lost: {exc}", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _netns_unavailable() -> str | None:
    if sys.platform != "linux":
        return f"network namespaces are Linux's ({sys.platform} has none)"
    if os.geteuid() != 0:
        return "creating a network namespace and a veth pair needs root"
    if shutil.which("ip") is None:
        return "no `ip` (iproute2) to create a network namespace with"
    return None


@dataclass(frozen=True)
class Link:
    """A network namespace joined to this one by a veth pair."""

    namespace: str
    inside: str  # the namespace's end of the pair
    host_address: str  # this side's address, where PostgreSQL listens

    def run(self, args: Sequence[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["ip", "netns", "exec", self.namespace, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def cut(self) -> None:
        """Take the namespace's end down: its packets stop, and nothing says goodbye."""
        _ip("-n", self.namespace, "link", "set", self.inside, "down")


@pytest.fixture
def link() -> Iterator[Link]:
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:6]
    namespace, outside, inside = f"payrl-{tag}", f"prl{tag}o", f"prl{tag}i"
    subnet = f"10.254.{int(tag[:2], 16)}"
    try:
        _ip("netns", "add", namespace)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace here: {exc.stderr.decode().strip()}")
    try:
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", namespace)
        _ip("addr", "add", f"{subnet}.1/30", "dev", outside)
        _ip("link", "set", outside, "up")
        _ip("-n", namespace, "addr", "add", f"{subnet}.2/30", "dev", inside)
        _ip("-n", namespace, "link", "set", inside, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        yield Link(namespace=namespace, inside=inside, host_address=f"{subnet}.1")
    finally:
        subprocess.run(["ip", "link", "del", outside], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)


@pytest.fixture
def database_on_the_link(link: Link, tmp_path: Path) -> Iterator[str]:
    """A private PostgreSQL listening on this side of the veth pair, trusting the pair."""
    hba = tmp_path / "pg_hba.conf"
    hba.write_text(f"host all all {link.host_address.rsplit('.', 1)[0]}.0/30 trust\n")
    hba.chmod(0o644)
    server = EmbeddedPostgres(
        tmp_path / "data",
        host=link.host_address,
        database="relay_leader",
        settings={"hba_file": str(hba)},
    )
    try:
        server.start()
    except EmbeddedExtraMissing as exc:
        pytest.skip(str(exc))
    try:
        yield server.url
    finally:
        server.stop()


class UtcClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@pytest_asyncio.fixture
async def uow_factory(database_on_the_link: str) -> AsyncIterator[PostgresUnitOfWorkFactory]:
    await migrate(database_on_the_link)
    async with open_pool(database_on_the_link, min_size=1, max_size=4) as pool:
        yield PostgresUnitOfWorkFactory(pool)


async def _wait_for_line(
    child: subprocess.Popen[str], prefix: str, within: float
) -> tuple[str, float]:
    """The child's next line starting with `prefix` (its log lines are passed over), and
    when it came (time.monotonic)."""
    assert child.stdout is not None
    async with asyncio.timeout(within):
        while True:
            line = await asyncio.to_thread(child.stdout.readline)
            assert line, f"the leader exited before saying {prefix!r}"
            if line.startswith(prefix):
                return line, time.monotonic()


async def test_a_standby_leads_within_60s_of_the_leaders_link_going_down(
    link: Link,
    database_on_the_link: str,
    uow_factory: PostgresUnitOfWorkFactory,
    kafka_bootstrap: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topics = Topics(initiated=f"vanish-{uuid.uuid4().hex[:8]}.payment.initiated")
    await ensure_topics(kafka_bootstrap, [topics.initiated], partitions=1)
    producer = create_producer(kafka_bootstrap, enable_idempotence=idempotent_producer())
    await producer.start()
    leader = link.run([sys.executable, "-c", _LEADER, database_on_the_link])
    relay = KafkaOutboxRelay(
        producer,
        uow_factory,
        topics,
        UtcClock(),
        poll_interval=0.2,
        leadership=RelayLeadership(database_on_the_link),
    )
    standby: asyncio.Task[None] | None = None
    try:
        await _wait_for_line(leader, "leading", 30)
        standby = asyncio.create_task(relay.run())
        payment = str(uuid.uuid4())
        async with uow_factory() as uow:
            await uow.outbox.add([_initiated(payment)])
            await uow.commit()
        await asyncio.sleep(3)
        # The lock really is the leader's: the standby waits.
        assert not relay.leading
        assert relay.published == 0

        cut = time.monotonic()
        link.cut()
        # Read as it comes: when the old leader says it lost the lock.
        noticing = asyncio.create_task(_wait_for_line(leader, "lost", NEW_LEADER_WITHIN_S))
        await eventually(
            lambda: relay.published == 1, NEW_LEADER_WITHIN_S, every=0.1, what="a new leader"
        )
        new_leader_after = time.monotonic() - cut
        # The old leader noticed on its own that it no longer leads.
        lost, noticed_at = await noticing
        noticed_after = noticed_at - cut
        with capsys.disabled():
            print(
                f"\nleader's link down: a standby published after {new_leader_after:.1f}s"
                f" (session bound {DEAD_AFTER_S:.0f} s); the old leader saw its loss after"
                f" {noticed_after:.1f}s ({lost.strip()})"
            )
        async with uow_factory() as uow:
            assert await uow.outbox.pending(10) == []
    finally:
        if standby is not None:
            relay.stop()
            await asyncio.wait_for(standby, 10)
        await producer.stop()
        leader.kill()
        leader.wait(10)


def _initiated(payment: str) -> OutboundMessage:
    return OutboundMessage(
        event_id=uuid.uuid4(),
        type="payment.initiated",
        key=payment,
        subject=payment,
        sequence=1,
        time=datetime.now(UTC),
        data=b'{"payment_id": "' + payment.encode() + b'"}',
        trace=TraceHeaders(),
    )
