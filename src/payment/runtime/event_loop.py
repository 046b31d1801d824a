"""The event loop `payment-service run` runs on: uvloop where it is installed, else asyncio's.

Measured on Apache Kafka (docs/performance.md, session 6): at 1,000 requests/s uvloop
answered 978-996 payments/s against 870-955 with asyncio's loop, for 0.62-0.69 ms of
service CPU per payment against 0.70-0.78, and halved psycopg's CPU per statement in
isolation. uvloop has no Windows build; there, and wherever it is missing, the service
runs on asyncio's own loop, unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's `new_event_loop` if uvloop can be imported, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """`asyncio.run(main)` on the loop `loop_factory` gives."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
