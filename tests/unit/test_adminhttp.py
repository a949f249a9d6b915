"""server/adminhttp.py on a real loopback socket: routes, methods, bad heads, the head timeout."""

from __future__ import annotations

import asyncio
import socket

import pytest

from mtls_proxy.server import adminhttp
from mtls_proxy.server.adminhttp import JSON, Answer, serve_routes


async def _ok() -> Answer:
    return 200, JSON, b'{"status": "ok"}'


async def _boom() -> Answer:
    raise RuntimeError("a bug in a route")


async def _exchange(raw: bytes, routes: dict | None = None, wait: float = 5.0) -> bytes:  # type: ignore[type-arg]
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    server = await serve_routes(routes or {"/healthz": _ok, "/boom": _boom}, sock)
    try:
        reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        writer.write(raw)
        data = await asyncio.wait_for(reader.read(), wait)
        writer.close()
        return data
    finally:
        await server.cleanup()


@pytest.mark.parametrize(
    ("raw", "start", "body"),
    [
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 200 OK", b'{"status": "ok"}'),
        (b"GET /healthz?x=1 HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 200 OK", b'{"status": "ok"}'),
        (b"HEAD /healthz HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 200 OK", b""),
        (b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 404 Not Found", b"404: Not Found\n"),
        (b"POST /healthz HTTP/1.1\r\nContent-Length: 1\r\n\r\nx", b"HTTP/1.1 405 ", b"405: Method"),
        (b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n", b"HTTP/1.1 400 ", b"400: Bad Request\n"),
        (b"GET /boom HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 500 ", b"500: Internal"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", b"HTTP/1.1 400 ", b"400"),
    ],
)
def test_answers(raw: bytes, start: bytes, body: bytes) -> None:
    data = asyncio.run(_exchange(raw))
    assert data.startswith(start), data[:100]
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"Connection: close" in head
    assert rest.startswith(body) if body else rest == b""
    if b" 405 " in head:
        assert b"Allow: GET, HEAD" in head


def test_a_head_that_never_completes_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adminhttp, "TIMEOUT", 0.2)
    assert asyncio.run(_exchange(b"GET /healthz HTTP/1.1\r\n", wait=5.0)) == b""
