"""The admin port's HTTP server: a handful of GET routes, parsed by llhttp (httptools, the data
plane's parser), one request per connection.

Why not aiohttp: it was the admin port's only user in `serve`, and importing it costs 14 MB of
RSS in every proxy process, more than half of what separates the proxy's resident memory at
start from nginx's (bench/NOTES.md, issue 18).

Rules:
1. GET and HEAD only (405 with `Allow` otherwise); an unknown path is 404; a head that llhttp
   refuses, or one over MAX_HEAD bytes, is 400; every answer closes the connection (probes and
   scrapers open one per request anyway).
2. A connection that has not sent a whole head within TIMEOUT seconds is closed.
3. A route that raises answers 500 and logs the error; the server goes on.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import httptools

logger = logging.getLogger("mtls_proxy.server")
MAX_HEAD: Final = 16 * 1024
TIMEOUT: Final = 10.0
JSON: Final = "application/json; charset=utf-8"
Answer = tuple[int, str, bytes]  # status, content type, body
Route = Callable[[], Awaitable[Answer]]
_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                   500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip


class _Request(asyncio.Protocol):
    def __init__(self, routes: Mapping[str, Route], conns: set[_Request]) -> None:
        self._routes, self._conns = routes, conns
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._size = 0
        self._done = False
        self._t: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._t = transport  # type: ignore[assignment]  # a stream transport
        self._conns.add(self)
        self._timer = asyncio.get_running_loop().call_later(TIMEOUT, self.close)  # rule 2

    def connection_lost(self, exc: Exception | None) -> None:
        self._conns.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        self._t = None

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._size += len(data)
        if self._size > MAX_HEAD:  # rule 1: a head this large is no probe's
            self._send(400, "text/plain; charset=utf-8", b"400: Bad Request\n", False)
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._headers_done()
        except httptools.HttpParserError:
            self._send(400, "text/plain; charset=utf-8", b"400: Bad Request\n", False)

    # llhttp's callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_headers_complete(self) -> None:
        self._headers_done()

    def _headers_done(self) -> None:
        if self._done:
            return
        self._done = True
        method = self._parser.get_method()
        path = httptools.parse_url(self._url).path.decode("latin-1") if self._url else ""
        if method not in (b"GET", b"HEAD"):
            self._send(405, "text/plain; charset=utf-8", b"405: Method Not Allowed\n", False)
            return
        route = self._routes.get(path)
        if route is None:
            self._send(404, "text/plain; charset=utf-8", b"404: Not Found\n", method == b"HEAD")
            return
        asyncio.get_running_loop().create_task(self._answer(route, method == b"HEAD"))

    async def _answer(self, route: Route, head: bool) -> None:
        try:
            status, ctype, body = await route()
        except Exception as exc:  # rule 3
            logger.error("admin endpoint failed", exc_info=exc)
            status, ctype, body = 500, "text/plain; charset=utf-8", b"500: Internal Server Error\n"
        self._send(status, ctype, body, head)

    def _send(self, status: int, ctype: str, body: bytes, head: bool) -> None:
        self._done = True
        t = self._t
        if t is None:
            return
        allow = "Allow: GET, HEAD\r\n" if status == 405 else ""
        t.write(
            (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n{allow}Connection: close\r\n\r\n"
            ).encode("latin-1")
            + (b"" if head else body)
        )
        t.close()

    def close(self) -> None:
        if self._t is not None:
            self._t.close()


class AdminServer:
    """The listening admin port (`serve_routes`); `cleanup` stops it."""

    def __init__(self, server: asyncio.Server, conns: set[_Request]) -> None:
        self._server, self._conns = server, conns

    async def cleanup(self) -> None:
        """Stop listening and close the open connections."""
        self._server.close()
        for conn in list(self._conns):
            conn.close()
        await self._server.wait_closed()


async def serve_routes(routes: Mapping[str, Route], sock: socket.socket) -> AdminServer:
    """Serve *routes* on the bound, listening socket *sock*."""
    conns: set[_Request] = set()
    server = await asyncio.get_running_loop().create_server(
        lambda: _Request(routes, conns), sock=sock
    )
    return AdminServer(server, conns)
