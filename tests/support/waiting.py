"""Waiting for a condition instead of sleeping for a guessed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable


async def eventually(
    condition: Callable[[], object], within: float = 5.0, *, every: float = 0.005, what: str = ""
) -> None:
    """Return once `condition()` is true; AssertionError after `within` seconds.

    For state that offers no event to wait on (counters, lists, captured output, a
    database row). `condition` may be a coroutine function: its result is awaited.
    """
    deadline = asyncio.get_running_loop().time() + within
    while not await _holds(condition):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what or 'condition'} still false after {within}s")
        await asyncio.sleep(every)


async def _holds(condition: Callable[[], object]) -> bool:
    result = condition()
    if inspect.isawaitable(result):
        result = await result
    return bool(result)


def eventually_sync(
    condition: Callable[[], object], within: float = 5.0, *, every: float = 0.02, what: str = ""
) -> None:
    """`eventually` for tests without an event loop (subprocesses, files, ports)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or 'condition'} still false after {within}s")
        time.sleep(every)
