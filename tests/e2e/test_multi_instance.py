"""Several instances (issue 6.4): three `run` processes, one group, one database, one dying.

Every few seconds one instance, picked at random, is killed with SIGKILL and started again
(sometimes with a failpoint armed, so it may die again at a random place), under a steady
load. The group rebalances each time: partitions move while their messages are half
handled, the outbox relay's leadership (an advisory lock) moves when its holder dies, and
the reconcilers of all instances look at the same payments.

Afterwards the chaos test's invariants must hold, and one more across the instances: the
events of one payment reach the topics in stream order (the first copy of each event,
by broker timestamp: `ce_sequence` never goes down along a key, starting at 1).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from payment.application import failpoints
from support.fake_stripe import FakeStripe

from .harness import ServiceProcess, StackFactory
from .reliability import (
    RECONCILE_AFTER_S,
    SEED,
    Audit,
    DatabaseState,
    Load,
    assert_exercised,
    chaos_env,
    flaky_gateway,
    format_summary,
    read_topics,
    ready_or_exited,
    run_length,
    settle,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DURATION_S = run_length("MULTI_INSTANCE_SECONDS", 90)
# The chaos phase lasts at least DURATION_S and until this many SIGKILLs: on a loaded
# machine a restart can take longer than the pause between kills.
MIN_KILLS = int(DURATION_S // 5)
ENV = chaos_env(db_pool_max=6)


@pytest.fixture
def gateway() -> Iterator[FakeStripe]:
    with flaky_gateway() as server:
        yield server


async def restart(service: ServiceProcess, spec: str | None) -> None:
    """Start again (armed with `spec` if given) and wait until ready, or dead at its point."""
    if spec:
        service.env[failpoints.ENV_VAR] = spec
    else:
        service.env.pop(failpoints.ENV_VAR, None)
    service.start()
    await ready_or_exited(service)


async def test_three_instances_one_dying_every_few_seconds(
    make_stack: StackFactory, gateway: FakeStripe, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    stack = await make_stack(instances=3, **gateway.env(), **ENV)
    rng = random.Random(SEED)
    load = Load(stack.orch, rate_per_s=6.0, seed=SEED, prefix="multi")
    causes: Counter[str] = Counter()
    points = sorted(failpoints.POINTS)

    load.start()
    end = time.monotonic() + DURATION_S
    while time.monotonic() < end or causes["SIGKILL"] < MIN_KILLS:
        await asyncio.sleep(rng.uniform(2.0, 4.0))
        # Whoever a failpoint took down meanwhile is restarted first.
        for service in stack.services:
            if not service.running:
                code = await service.wait_exit(5)
                assert code == failpoints.EXIT_CODE, f"{service.name} exited with {code}"
                causes["failpoint"] += 1
                await restart(service, None)
        victim = rng.choice(stack.services)
        await victim.kill()
        causes["SIGKILL"] += 1
        spec = f"{rng.choice(points)}@{rng.randint(1, 8)}" if rng.random() < 0.4 else None
        await restart(victim, spec)
    await load.stop()
    chaos_s = time.monotonic() - started

    for service in stack.services:
        if not service.running:
            await service.wait_exit(5)
            await restart(service, None)
        elif failpoints.ENV_VAR in service.env:
            await service.kill()  # armed: could still die while draining
            await restart(service, None)
    await settle(stack, load, gateway, timeout_s=120)
    codes = await asyncio.gather(*(s.terminate() for s in stack.services))
    assert codes == [0, 0, 0]

    intents, stats = gateway.ledger()
    audit = Audit(
        bookings=load.bookings,
        requests=len(load.requests),
        records=await read_topics(stack.bootstrap, stack.topics),
        db=await DatabaseState.read(stack.database_url, stale_after_s=RECONCILE_AFTER_S),
        intents=intents,
        gateway_stats=stats,
    )
    summary = audit.summary()
    rows: list[tuple[str, object]] = [
        ("seed", SEED),
        ("instances", len(stack.services)),
        ("kills (SIGKILL / failpoint)", f"{causes['SIGKILL']} / {causes['failpoint']}"),
        ("starts per instance", [s.starts for s in stack.services]),
        *summary.items(),
        ("payments checked for order", len({r.key for r in audit.records if r.key})),
        ("chaos phase (s)", round(chaos_s, 1)),
    ]
    with capsys.disabled():
        print("\n" + format_summary("three instances, one killed every few seconds", rows))

    problems = audit.violations()
    assert not problems, "\n".join(problems[:50])
    assert summary["lost requests"] == 0 and summary["double charges"] == 0
    assert_exercised(summary, lost_answers=True)
    assert causes["failpoint"] > 0, "no armed failpoint fired: only SIGKILLs were tested"
