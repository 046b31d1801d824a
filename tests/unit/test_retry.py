"""The one retry schedule: exponential ceilings, full jitter below them, reset on success."""

from __future__ import annotations

from payment.application.retry import Backoff


def test_waits_grow_to_the_maximum_and_are_drawn_below_the_ceiling() -> None:
    top = Backoff(initial=0.1, maximum=1.0, rng=lambda: 1.0)
    assert [round(top.next(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    half = Backoff(initial=0.1, maximum=1.0, rng=lambda: 0.5)
    assert [round(half.next(), 3) for _ in range(3)] == [0.05, 0.1, 0.2]


def test_a_success_starts_again_from_the_shortest_wait() -> None:
    backoff = Backoff(initial=0.1, maximum=1.0, rng=lambda: 1.0)
    for _ in range(4):
        backoff.next()
    assert backoff.attempts == 4
    backoff.reset()
    assert backoff.attempts == 0
    assert backoff.next() == 0.1


def test_jitter_spreads_callers_hit_by_one_outage() -> None:
    waits = {round(Backoff(initial=1.0, maximum=1.0).next(), 6) for _ in range(50)}
    assert len(waits) > 40
    assert all(0 <= w <= 1.0 for w in waits)
