"""Failpoints: parsing PAYMENT_FAILPOINTS, no-op when unarmed, os._exit when a trigger fires."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from payment.application import failpoints


@pytest.fixture(autouse=True)
def _disarmed() -> Iterator[None]:
    failpoints.arm(None)
    yield
    failpoints.arm(None)


def test_unarmed_points_do_nothing() -> None:
    for name in failpoints.POINTS:
        failpoints.hit(name)
    assert failpoints.arm_from_environment({}) == []


def test_parse_probabilities_nth_hits_and_bare_names() -> None:
    armed = failpoints.arm("after_charge=0.05, before_offset_commit@3,after_publish")
    assert armed == ["after_charge", "after_publish", "before_offset_commit"]
    triggers = failpoints.parse("after_charge=0,before_charge@2")
    assert not any(triggers["after_charge"].fires() for _ in range(100))
    assert [triggers["before_charge"].fires() for _ in range(4)] == [False, True, False, False]


@pytest.mark.parametrize(
    "spec",
    ["nowhere=0.5", "after_charge=1.5", "after_charge=x", "after_charge@0", "after_charge@two"],
)
def test_a_bad_spec_names_the_variable(spec: str) -> None:
    with pytest.raises(ValueError, match=r"^PAYMENT_FAILPOINTS: "):
        failpoints.parse(spec)


def _run(code: str, spec: str) -> subprocess.CompletedProcess[str]:
    program = (
        "from payment.application import failpoints\n"
        f"failpoints.arm_from_environment({{'PAYMENT_FAILPOINTS': {spec!r}}})\n" + code
    )
    return subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=30, check=False
    )


def test_the_nth_hit_exits_at_once_without_cleanup() -> None:
    run = _run(
        "import atexit\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "for i in range(5):\n"
        "    print('hit', i, flush=True)\n"
        "    try:\n"
        "        failpoints.hit('after_charge')\n"
        "    finally:\n"
        "        print('finally', i, flush=True)\n",
        "after_charge@3",
    )
    assert run.returncode == failpoints.EXIT_CODE
    assert run.stdout.splitlines() == ["hit 0", "finally 0", "hit 1", "finally 1", "hit 2"]
    assert "failpoint after_charge: exiting" in run.stderr


def test_probability_one_always_fires_and_other_points_pass() -> None:
    run = _run(
        "failpoints.hit('before_charge')\nfailpoints.hit('after_charge')\n", "after_charge=1"
    )
    assert run.returncode == failpoints.EXIT_CODE
    assert run.stderr.strip().endswith("failpoint after_charge: exiting")
