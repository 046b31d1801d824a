"""aiokafka on uvloop: a write to a connection the broker reset is a connection error.

aiokafka (0.14) turns an `OSError` raised while it writes a request into
`KafkaConnectionError`: it closes the connection, and its callers (the producer's sender,
the consumer's fetcher and coordinator) connect again. On asyncio's loop a write to a
transport that a reset has closed raises nothing (the connection's reader then sees the
reset). On uvloop it raises `RuntimeError` ("the handler is closed"), which aiokafka does
not expect: the producer's sender task or the consumer's coordination routine ends for good
(aio-libs/aiokafka#1038, open). A broker restart under load is enough.

`tolerate_closed_transports()` wraps the two methods of aiokafka's connection that write,
so that this `RuntimeError`, on a transport that is closing, is handled exactly as aiokafka
handles an `OSError` there. Any other `RuntimeError` still propagates.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Final

from aiokafka.conn import AIOKafkaConnection, CloseReason
from aiokafka.errors import KafkaConnectionError

_WRAPPED: Final = "_payment_tolerates_closed_transports"
_WRITING_METHODS: Final = ("send", "_send_sasl_token")


def tolerate_closed_transports() -> None:
    """Wrap aiokafka's writing methods (once; calling again changes nothing)."""
    for name in _WRITING_METHODS:
        method = getattr(AIOKafkaConnection, name)
        if not getattr(method, _WRAPPED, False):
            setattr(AIOKafkaConnection, name, _tolerant(method))


def _tolerant(write: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(write)
    def tolerant(conn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return write(conn, *args, **kwargs)
        except RuntimeError as exc:
            writer = conn._writer
            if writer is None or not writer.transport.is_closing():
                raise
            conn.close(reason=CloseReason.CONNECTION_BROKEN, exc=exc)
            raise KafkaConnectionError(
                f"Connection at {conn.host}:{conn.port} broken: {exc}"
            ) from exc

    setattr(tolerant, _WRAPPED, True)
    return tolerant


__all__ = ["tolerate_closed_transports"]
