"""A minimal HTTP server for health and metrics: GET /health/live, /health/ready, /metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], Awaitable[dict[str, str]]]
MetricsRender = Callable[[], Awaitable[str]]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer:
    """Serves liveness, readiness (every check must answer "ok") and Prometheus metrics.

    Written on asyncio streams: three GET endpoints do not earn a web framework.
    """

    def __init__(
        self, host: str, port: int, readiness: ReadinessCheck, metrics: MetricsRender
    ) -> None:
        self._host = host
        self._port = port
        self._readiness = readiness
        self._metrics = metrics
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        log.info("http: listening on %s:%d", self._host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5.0)
            while (await asyncio.wait_for(reader.readline(), 5.0)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode("latin-1").split()
            status, ctype, body = await self._route(parts)
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    async def _route(self, parts: list[str]) -> tuple[int, str, bytes]:
        if len(parts) < 2:
            return 405, "text/plain", b"bad request\n"
        method, path = parts[0], parts[1].split("?", 1)[0]
        if method != "GET":
            return 405, "text/plain", b"only GET\n"
        if path == "/health/live":
            return 200, "text/plain", b"ok\n"
        if path == "/health/ready":
            checks = await self._readiness()
            ok = all(v == "ok" for v in checks.values())
            body = "".join(f"{k}: {v}\n" for k, v in checks.items()).encode()
            return (200 if ok else 503), "text/plain", body
        if path == "/metrics":
            text = await self._metrics()
            return 200, "text/plain; version=0.0.4; charset=utf-8", text.encode()
        return 404, "text/plain", b"not found\n"
