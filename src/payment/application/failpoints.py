"""Failpoints: named places where a crash test makes the process die at once (`os._exit`).

A test arms them through one environment variable, read once when `run` starts
(`arm_from_environment`)::

    PAYMENT_FAILPOINTS="after_charge=0.05,before_offset_commit=0.02"   # probabilities
    PAYMENT_FAILPOINTS="after_charge@3"                                # the 3rd hit only
    PAYMENT_FAILPOINTS="after_charge"                                  # the first hit

Each entry is `name=probability` (every hit dies with that probability), `name@n` (the
n-th hit of that point in this process dies) or a bare `name` (same as `name@1`). A point
that fires writes one line `failpoint NAME: exiting` to stderr and calls
`os._exit(EXIT_CODE)`: no `finally`, no flush, no graceful shutdown, exactly like a
SIGKILL at that instruction (the database and broker see the connections drop).

Unarmed (production: the variable is unset) `hit()` is one truthiness test of an empty
module-level dict. The standard library only, so the application layer may call it.

The points (where they sit and what a crash there tests):

- `after_inbox_insert`: request handled, its inbox mark written (or, on the first try of
  a request expected new, queued with the unit of work's one message), nothing committed.
- `after_initiated_commit`: payment initiated and committed, its offset not.
- `before_charge`: payment loaded, gateway not called.
- `after_charge`: the gateway answered, nothing recorded (the charge exists, our store
  does not know it: restart must find it, not charge again).
- `before_terminal_commit`: outcome events appended, transaction not committed.
- `after_terminal_commit`: outcome committed, offset of payment.initiated not.
- `before_publish`, `after_publish`: a relay send about to start / acknowledged and not
  yet marked published (restart re-publishes the same `ce_id`).
- `after_mark_published`: a relay batch marked published.
- `before_offset_commit`, `after_offset_commit`: around a Kafka offset commit.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Mapping
from typing import Final

ENV_VAR: Final = "PAYMENT_FAILPOINTS"
# What a shell reports for a process killed by SIGKILL (128 + 9).
EXIT_CODE: Final = 137

POINTS: Final = frozenset(
    {
        "after_inbox_insert",
        "after_initiated_commit",
        "before_charge",
        "after_charge",
        "before_terminal_commit",
        "after_terminal_commit",
        "before_publish",
        "after_publish",
        "after_mark_published",
        "before_offset_commit",
        "after_offset_commit",
    }
)


class _Trigger:
    """When one armed point fires: with a probability per hit, or at its n-th hit."""

    __slots__ = ("hits", "nth", "probability")

    def __init__(self, *, probability: float | None = None, nth: int | None = None) -> None:
        self.probability = probability
        self.nth = nth
        self.hits = 0

    def fires(self) -> bool:
        self.hits += 1
        if self.nth is not None:
            return self.hits == self.nth
        assert self.probability is not None
        return random.random() < self.probability


# Empty unless a test armed some points: `hit` is then a no-op.
_armed: dict[str, _Trigger] = {}


def parse(spec: str) -> dict[str, _Trigger]:
    """Triggers from a `PAYMENT_FAILPOINTS` value; ValueError naming the bad entry."""
    triggers: dict[str, _Trigger] = {}
    for raw in spec.split(","):
        entry = raw.strip()
        if entry:
            name, trigger = _parse_entry(entry)
            triggers[name] = trigger
    return triggers


def _parse_entry(entry: str) -> tuple[str, _Trigger]:
    name, sep, value = entry.partition("=") if "=" in entry else entry.partition("@")
    name = name.strip()
    if name not in POINTS:
        raise ValueError(f"{ENV_VAR}: unknown failpoint {name!r}")
    if not sep:
        return name, _Trigger(nth=1)
    bad = f"{ENV_VAR}: expected {name}=probability (0 to 1) or {name}@n (n >= 1), not {entry!r}"
    try:
        number = float(value) if sep == "=" else int(value)
    except ValueError:
        raise ValueError(bad) from None
    if sep == "=":
        if not 0.0 <= number <= 1.0:
            raise ValueError(bad)
        return name, _Trigger(probability=number)
    if number < 1:
        raise ValueError(bad)
    return name, _Trigger(nth=int(number))


def arm(spec: str | None) -> list[str]:
    """Arm the points of `spec` (replacing any armed before); returns their names."""
    _armed.clear()
    if spec:
        _armed.update(parse(spec))
    return sorted(_armed)


def arm_from_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """`arm(os.environ[PAYMENT_FAILPOINTS])`: call once at start-up."""
    return arm((os.environ if environ is None else environ).get(ENV_VAR))


def hit(name: str) -> None:
    """Pass the point `name`: dies here if it is armed and its trigger fires."""
    if _armed:
        trigger = _armed.get(name)
        if trigger is not None and trigger.fires():
            _die(name)


def _die(name: str) -> None:
    # os.write, not logging or print: nothing buffered may stand between us and the exit.
    try:
        sys.stderr.flush()
        os.write(2, f"failpoint {name}: exiting\n".encode())
    finally:
        os._exit(EXIT_CODE)


__all__ = ["ENV_VAR", "EXIT_CODE", "POINTS", "arm", "arm_from_environment", "hit", "parse"]
