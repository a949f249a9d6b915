"""WebSocket upgrades (SMG-059): tunnelled only after the upstream's real 101 with the right
Sec-WebSocket-Accept; the policy is checked and the identity injected on the upgrade request;
a wrong 101 is a 502; a declined upgrade leaves the connection speaking HTTP."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from tests.helpers import (
    ALLOWED_URI,
    Pki,
    client_ctx,
    connect,
    read_response,
    run_proxy,
    serve_raw,
)


@dataclass
class WsUpstream:
    port: int = 0
    upgrades: list[dict[str, str]] = field(default_factory=list)


@pytest.fixture(scope="module")
def ws_upstream() -> Iterator[WsUpstream]:
    """A real aiohttp WebSocket echo server (it computes Sec-WebSocket-Accept itself)."""
    state = WsUpstream()
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def echo(request: web.Request) -> web.StreamResponse:
        state.upgrades.append({k.lower(): v for k, v in request.headers.items()})
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    async def start() -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/ws", echo)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        state.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return runner

    def run() -> None:
        asyncio.set_event_loop(loop)
        runner = loop.run_until_complete(start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    ready.wait(10)
    yield state
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)


async def _talk(port: int, ctx: ssl.SSLContext) -> list[str]:
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(f"wss://localhost:{port}/ws", ssl=ctx) as ws,
    ):
        out = []
        for text in ("hello", "x" * 100_000):
            await ws.send_str(text)
            msg = await ws.receive(timeout=10)
            out.append(msg.data)
        await ws.send_bytes(b"\x00\x01binary")
        out.append(repr((await ws.receive(timeout=10)).data))
        return out


def test_websocket_is_tunnelled_with_identity_on_the_upgrade(
    tp: Pki, ws_upstream: WsUpstream
) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{ws_upstream.port}") as p:
        before = len(ws_upstream.upgrades)
        got = asyncio.run(_talk(p.port, client_ctx(tp, "good")))
        assert got == ["echo:hello", "echo:" + "x" * 100_000, repr(b"\x00\x01binary")]
        headers = ws_upstream.upgrades[before]
        assert headers["x-client-spiffe-id"] == ALLOWED_URI
        assert (
            headers["upgrade"].lower() == "websocket" and "upgrade" in headers["connection"].lower()
        )
        assert "client-good" in headers["x-forwarded-client-cert"]
        deadline = time.monotonic() + 5
        access: list[dict[str, object]] = []
        while not access and time.monotonic() < deadline:
            access = [r for r in p.records() if r.get("msg") == "access" and r.get("path") == "/ws"]
            time.sleep(0.05)
        assert access and access[0]["status"] == 101 and int(str(access[0]["bytes_out"])) > 100_000


def test_websocket_from_a_denied_client_never_reaches_the_upstream(
    tp: Pki, ws_upstream: WsUpstream
) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{ws_upstream.port}") as p:
        before = len(ws_upstream.upgrades)
        with connect(p.port, client_ctx(tp, "other")) as s:
            s.sendall(_upgrade_request())
            assert read_response(s, bytearray())[0] == 403
        assert len(ws_upstream.upgrades) == before


def _upgrade_request(path: bytes = b"/ws") -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )


def _raw_upstream(response: bytes) -> tuple[socket.socket, list[bytes]]:
    seen: list[bytes] = []

    def serve(conn: socket.socket, _: int) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                break
            buf += chunk
        seen.append(buf)
        conn.sendall(response)
        if response.startswith(b"HTTP/1.1 200"):
            # keep serving on this connection: the next request after a declined upgrade
            while chunk := conn.recv(65536):
                seen.append(chunk)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext")
        conn.close()

    return serve_raw(serve), seen


def test_a_101_with_a_wrong_accept_is_a_502(tp: Pki) -> None:
    srv, _ = _raw_upstream(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: d3Jvbmc=\r\n\r\n\x81\x05hello"
    )
    try:
        with run_proxy(tp, f"http://127.0.0.1:{srv.getsockname()[1]}") as p:
            with connect(p.port, client_ctx(tp, "good")) as s:
                s.sendall(_upgrade_request())
                status, _, body = read_response(s, bytearray())
            assert status == 502 and b"hello" not in body
    finally:
        srv.close()


def test_a_declined_websocket_upgrade_keeps_speaking_http(tp: Pki) -> None:
    srv, seen = _raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")
    try:
        with run_proxy(tp, f"http://127.0.0.1:{srv.getsockname()[1]}") as p:
            with connect(p.port, client_ctx(tp, "good")) as s:
                s.sendall(_upgrade_request() + b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
                buf = bytearray()
                assert read_response(s, buf)[2] == b"no"
                assert read_response(s, buf)[2] == b"next"
            assert any(b.startswith(b"GET /after HTTP/1.1") for b in seen[1:])
    finally:
        srv.close()


def test_a_websocket_upgrade_pipelined_behind_a_request_waits_its_turn(
    tp: Pki, ws_upstream: WsUpstream
) -> None:
    """The upgrade request queued behind a plain one: the plain response, then the 101; the
    bytes held after the upgrade request are only interpreted once its own answer is in."""
    mask = os.urandom(4)
    frame = b"\x81\x84" + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(b"ping"))
    with (
        run_proxy(tp, f"http://127.0.0.1:{ws_upstream.port}") as p,
        connect(p.port, client_ctx(tp, "good")) as s,
    ):
        # The frame rides in the same write, right behind the upgrade request.
        s.sendall(b"GET /plain HTTP/1.1\r\nHost: a\r\n\r\n" + _upgrade_request() + frame)
        buf = bytearray()
        assert read_response(s, buf)[0] == 404  # the echo server has no /plain
        assert read_response(s, buf, head_only=True)[0] == 101
        while len(buf) < 2 + len("echo:ping"):
            buf += s.recv(65536)
        assert bytes(buf[:2]) == b"\x81\x09" and bytes(buf[2:11]) == b"echo:ping"
