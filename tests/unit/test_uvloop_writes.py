"""aiokafka's connection on uvloop, written to after the peer reset it (aiokafka#1038).

Below the client API: a real TCP connection on uvloop whose peer resets it, handed to an
`AIOKafkaConnection` as its reader and writer, as aiokafka's own connect does.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop
from aiokafka.conn import AIOKafkaConnection, CloseReason
from aiokafka.errors import KafkaConnectionError
from aiokafka.protocol.metadata import MetadataRequest

from payment.adapters.kafka import uvloop_writes


def on_uvloop(main: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())  # type: ignore[arg-type]


async def reset_connection() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection whose server answered with a reset (RST), seen by the client."""

    async def reset(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(100):
        if writer.transport.is_closing():
            break
        await asyncio.sleep(0.01)
    server.close()
    assert writer.transport.is_closing()
    return reader, writer


def connection_on(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, closed: list[Any]
) -> AIOKafkaConnection:
    conn = AIOKafkaConnection("127.0.0.1", 9092)
    conn._reader, conn._writer = reader, writer
    conn._read_task = asyncio.get_running_loop().create_future()  # the reader, not started
    conn._on_close_cb = lambda _conn, reason: closed.append(reason)
    conn._versions = {MetadataRequest.API_KEY: (0, 0)}
    return conn


@pytest.fixture
def unwrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiokafka's own methods, as before any wrapping (restored afterwards)."""
    for name in ("send", "_send_sasl_token"):
        method = getattr(AIOKafkaConnection, name)
        monkeypatch.setattr(AIOKafkaConnection, name, getattr(method, "__wrapped__", method))


@pytest.mark.usefixtures("unwrapped")
def test_uvloop_raises_runtime_error_where_aiokafka_expects_os_error() -> None:
    # What the wrapper is for: left alone, the error is not aiokafka's kind.
    async def main() -> None:
        conn = connection_on(*await reset_connection(), closed=[])
        with pytest.raises(RuntimeError, match="closed"):
            conn.send(MetadataRequest([]))
        conn.close()

    on_uvloop(main)


@pytest.mark.usefixtures("unwrapped")
def test_wrapped_a_write_to_a_reset_connection_closes_it_as_broken() -> None:
    uvloop_writes.tolerate_closed_transports()
    uvloop_writes.tolerate_closed_transports()  # twice: wrapped once

    async def main() -> None:
        closed: list[Any] = []
        conn = connection_on(*await reset_connection(), closed=closed)
        with pytest.raises(KafkaConnectionError, match="broken"):
            conn.send(MetadataRequest([]))
        assert (conn._writer, closed) == (None, [CloseReason.CONNECTION_BROKEN])
        # Closed now: the next send says so, as aiokafka always has.
        with pytest.raises(KafkaConnectionError, match="No connection"):
            conn.send(MetadataRequest([]))

    on_uvloop(main)
    assert AIOKafkaConnection.send.__wrapped__.__name__ == "send"  # type: ignore[attr-defined]
    assert not hasattr(AIOKafkaConnection.send.__wrapped__, "__wrapped__")  # type: ignore[attr-defined]


@pytest.mark.usefixtures("unwrapped")
def test_wrapped_a_runtime_error_on_an_open_connection_still_propagates() -> None:
    uvloop_writes.tolerate_closed_transports()

    async def main() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # until the client closes
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.sockets[0].getsockname()[1]
        )
        closed: list[Any] = []
        conn = connection_on(reader, writer, closed)

        def broken_write(data: bytes) -> None:
            raise RuntimeError("a bug, not a reset")

        writer.write = broken_write  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="a bug"):
            conn.send(MetadataRequest([]))
        assert closed == []
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    on_uvloop(main)
