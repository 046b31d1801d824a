"""KeyBackoff: each failing key waits on its own, and a success forgets it."""

from __future__ import annotations

from payment.adapters.kafka.key_backoff import KeyBackoff


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_failing_key_waits_alone_and_longer_each_time() -> None:
    clock = Clock()
    keys = KeyBackoff(initial=1.0, maximum=8.0, clock=clock, rng=lambda: 1.0)
    assert keys.next_due_in() is None and not keys.waiting()

    assert keys.failed("bad") == 1.0
    assert keys.waiting() == {"bad"}
    assert keys.next_due_in() == 1.0
    clock.now += 1.0
    assert keys.waiting() == set()
    assert keys.failed("bad") == 2.0
    assert keys.failed("bad") == 4.0
    assert keys.failed("other") == 1.0
    assert keys.waiting() == {"bad", "other"}
    assert keys.next_due_in() == 1.0
    assert len(keys) == 2


def test_a_success_forgets_the_key() -> None:
    clock = Clock()
    keys = KeyBackoff(initial=1.0, maximum=8.0, clock=clock, rng=lambda: 1.0)
    keys.failed("bad")
    keys.failed("bad")
    keys.succeeded("bad")
    assert len(keys) == 0 and keys.waiting() == set()
    assert keys.failed("bad") == 1.0


def test_a_due_key_without_rows_is_forgotten_and_a_waiting_one_kept() -> None:
    clock = Clock()
    keys = KeyBackoff(initial=1.0, maximum=8.0, clock=clock, rng=lambda: 1.0)
    keys.failed("gone")
    keys.failed("still")
    keys.failed("waiting")
    keys.failed("waiting")  # due in 2 s
    clock.now += 1.0
    keys.forget_due(keep={"still"})
    assert keys.waiting() == {"waiting"}
    assert len(keys) == 2
