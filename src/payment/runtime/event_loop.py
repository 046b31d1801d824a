"""The event loop `payment-service run` runs on: uvloop where it is installed, else asyncio's.

Measured on Apache Kafka (docs/performance.md, sessions 6 and 8): uvloop costs the service
less CPU per payment than asyncio's loop, and answers more at 1,000 requests/s. uvloop has
no Windows build; there, and wherever it is missing, the service runs on asyncio's own
loop, unchanged. On uvloop, aiokafka needs `tolerate_closed_transports`
(adapters/kafka/uvloop_writes.py): without it a broker that resets a connection under load
can end the producer's sender or the consumer's coordinator for good.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from payment.adapters.kafka.uvloop_writes import tolerate_closed_transports

_T = TypeVar("_T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's `new_event_loop` if uvloop can be imported, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    tolerate_closed_transports()
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """`asyncio.run(main)` on the loop `loop_factory` gives."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
