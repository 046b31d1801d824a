"""The event loop `payment-service run` runs on: uvloop where it is installed, else asyncio's.

Measured on Apache Kafka: docs/performance.md, sessions 6 and 8. uvloop has no Windows
build; there, and wherever it is missing, the service runs as `asyncio.run` would run it.
On uvloop, aiokafka needs `tolerate_closed_transports` (adapters/kafka/uvloop_writes.py):
without it a broker that resets a connection under load can end the producer's sender or
the consumer's coordinator for good. `dev` and `demo` stay on asyncio's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from payment.adapters.kafka.uvloop_writes import tolerate_closed_transports

_T = TypeVar("_T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's `new_event_loop` if uvloop can be imported; None (asyncio's default, as
    `asyncio.run` uses it) if not."""
    try:
        import uvloop
    except ImportError:
        return None
    tolerate_closed_transports()
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """`asyncio.run(main)` on the loop `loop_factory` gives."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
