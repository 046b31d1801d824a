"""The collector settings `run` applies before its event loop starts."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from payment.runtime.garbage_collection import (
    OLDER_THRESHOLDS,
    YOUNG_THRESHOLD,
    settle_start_up_objects,
)


@pytest.fixture
def collector_restored() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("collector_restored")
def test_start_up_objects_are_frozen_and_young_collections_come_less_often() -> None:
    survivor = [object()]  # start-up state, reachable from here
    settle_start_up_objects()
    assert gc.get_freeze_count() > 0
    # Frozen: in no generation a collection walks.
    assert gc.is_tracked(survivor)
    assert not any(tracked is survivor for tracked in gc.get_objects())
    assert gc.get_threshold() == (YOUNG_THRESHOLD, *OLDER_THRESHOLDS)
    assert YOUNG_THRESHOLD > 700  # CPython's default


@pytest.mark.usefixtures("collector_restored")
def test_cycles_made_after_start_up_are_still_collected() -> None:
    settle_start_up_objects()

    class Node:
        def __init__(self) -> None:
            self.other: Node | None = None

    first, second = Node(), Node()
    first.other, second.other = second, first
    del first, second
    assert gc.collect() >= 2
