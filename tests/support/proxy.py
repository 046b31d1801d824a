"""A small asyncio TCP proxy for tests: forwards bytes, or cuts connections and drops responses."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
from types import TracebackType
from typing import Literal, Self

ProxyMode = Literal["forward", "cut", "drop_response", "hang"]
"""What the proxy does with the next bytes it sees.

- `forward`: pass everything both ways.
- `cut`: reset the client's connection as soon as it sends anything; upstream sees nothing
  (the request never reached the server, though the client cannot know that).
- `drop_response`: forward the request, and when the server's answer starts, throw it away
  and reset the client's connection (the server acted; the client never hears about it).
- `hang`: forward the request and swallow the answer, keeping the connection open (the
  client waits for its own timeout).

With `target` set (say b"POST "), a mode other than `forward` applies only to requests
whose request line starts with it; the others are forwarded.
"""

_CHUNK = 65536
# The start of an HTTP/1.x request: what tells a new request from more of the last body.
_REQUEST_LINE = re.compile(rb"[A-Z]+ \S+ HTTP/1\.[01]\r\n")


def _reset(writer: asyncio.StreamWriter) -> None:
    # SO_LINGER 0 turns close into a TCP RST: the client sees "connection reset by peer",
    # as with a crashed load balancer, rather than a polite end of stream.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and its upstream twin."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        # Whether the request in flight on this connection is one the mode applies to
        # (HTTP/1.1 clients send the next request only after the last response).
        self.targeted = True

    def reset(self) -> None:
        _reset(self.client)
        if self.upstream is not None:
            self.upstream.transport.abort()


class TcpProxy:
    """Listens on 127.0.0.1 (a free port) and relays to `upstream_host:upstream_port`.

    `mode` may change at any time; it is read each time bytes arrive, so a pooled
    keep-alive connection obeys the new mode on its next request. Counters record what
    happened, so a test can assert that a request really reached the server.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.mode: ProxyMode = "forward"
        self.target: bytes | None = None
        self.connections = 0
        self.cut_requests = 0
        self.dropped_responses = 0
        self.hung_responses = 0
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._links: set[_Link] = set()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("proxy not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def start(self) -> Self:
        """Listen; after a `stop`, listen again on the same port."""
        if self._server is not None:
            return self
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self._port or 0, reuse_address=True
        )
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening (new connections are refused) and reset every live connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self.cut_all()
        if server is not None:
            await server.wait_closed()

    def cut_all(self) -> None:
        """Reset every live connection, in whatever state it is."""
        for link in list(self._links):
            link.reset()
            for task in link.tasks:
                task.cancel()
        self._links.clear()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        link = _Link(writer)
        self._links.add(link)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                link.reset()
                return
            link.upstream = up_writer
            link.tasks = [
                asyncio.create_task(self._requests(link, reader, up_writer)),
                asyncio.create_task(self._responses(link, up_reader, writer)),
            ]
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self._links.discard(link)
            link.reset()

    async def _requests(
        self, link: _Link, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter
    ) -> None:
        while data := await reader.read(_CHUNK):
            if _REQUEST_LINE.match(data):
                link.targeted = self.target is None or data.startswith(self.target)
            if self.mode == "cut" and link.targeted:
                self.cut_requests += 1
                link.reset()
                return
            upstream.write(data)
            await upstream.drain()
        upstream.write_eof()

    async def _responses(
        self, link: _Link, reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        while data := await reader.read(_CHUNK):
            mode = self.mode if link.targeted else "forward"
            if mode == "drop_response":
                self.dropped_responses += 1
                link.reset()
                return
            if mode == "hang":
                # Stop relaying but keep the client's connection open: it waits until it
                # gives up (closing its side ends the link) or the proxy stops.
                self.hung_responses += 1
                return
            client.write(data)
            await client.drain()
        client.close()
