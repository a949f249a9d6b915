"""upstream.UpstreamConnection: the shell around framing.ResponseFramer, with a fake transport
and a recording sink (what the client side sees, in order)."""

from __future__ import annotations

from typing import Any

from mtls_proxy.core.errors import ProxyError
from mtls_proxy.dataplane.upstream import UpstreamConnection, UpstreamPool
from mtls_proxy.http1.response import ResponseHead
from mtls_proxy.http1.websocket import accept_for

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


class Transport:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None: ...


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_response_head(self, head: ResponseHead, mode: int, length: int) -> None:
        self.calls.append(("head", head.status, mode, length))

    def on_response_body(self, data: bytes) -> None:
        self.calls.append(("body", data))

    def on_response_end(self, conn: UpstreamConnection, reusable: bool) -> None:
        self.calls.append(("end", reusable))

    def on_upstream_error(self, conn: UpstreamConnection, exc: ProxyError, kind: str) -> None:
        self.calls.append(("error", kind))

    def flush(self) -> None:
        self.calls.append(("flush",))

    def upstream_first_byte(self) -> None:
        self.calls.append(("first byte",))

    def pause_client_reading(self, paused: bool) -> None: ...

    def on_switch(self, head: ResponseHead) -> None:
        self.calls.append(("switch", head.status))

    def on_tunnel_data(self, data: bytes) -> None:
        self.calls.append(("tunnel", data))

    def on_tunnel_closed(self) -> None:
        self.calls.append(("tunnel closed",))


def connection(is_head: bool = False, ws_key: bytes | None = None) -> tuple[Any, Sink, Transport]:
    pool = UpstreamPool(None, 1.0)  # type: ignore[arg-type]  # never connects
    conn = UpstreamConnection(pool)
    transport = Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    sink = Sink()
    conn.begin(sink, is_head, ws_key)
    return conn, sink, transport


def test_a_response_in_pieces_then_the_next_one() -> None:
    conn, sink, transport = connection()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    conn.data_received(b"cd")
    assert sink.calls == [
        ("first byte",),
        ("head", 200, 1, 4),
        ("body", b"ab"),
        ("flush",),
        ("body", b"cd"),
        ("end", True),
        ("flush",),
    ]
    assert conn.sink is None and not transport.closed
    sink2 = Sink()
    conn.begin(sink2, False)
    conn.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert sink2.calls == [("first byte",), ("head", 204, 0, 0), ("end", True), ("flush",)]


def test_the_pieces_before_a_framing_error_come_first() -> None:
    conn, sink, transport = connection()
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n")
    assert sink.calls == [
        ("first byte",),
        ("head", 200, 2, 0),
        ("body", b"ok"),
        ("error", "protocol"),
        ("flush",),
    ]
    assert transport.closed and conn.sink is None


def test_bytes_after_the_response_close_the_connection() -> None:
    conn, sink, transport = connection()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert sink.calls[-2:] == [("end", True), ("flush",)]
    conn.pool.idle.append(conn)
    conn.data_received(b"HTTP/1.1 200 OK\r\n")  # unsolicited: never reaches another client
    assert transport.closed and conn.pool.idle == []
    assert sink.calls[-2:] == [("end", True), ("flush",)]


def test_a_close_ends_a_close_delimited_body() -> None:
    conn, sink, _ = connection()
    conn.data_received(b"HTTP/1.1 200 OK\r\n\r\nall")
    conn.connection_lost(None)
    assert sink.calls[-3:] == [("flush",), ("end", False), ("flush",)]


def test_a_close_in_the_body_is_a_reset() -> None:
    conn, sink, _ = connection()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npart")
    conn.connection_lost(None)
    assert sink.calls[-1] == ("error", "reset") and conn.sink is None


def test_a_close_after_the_response_is_nothing() -> None:
    conn, sink, _ = connection()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    n = len(sink.calls)
    conn.connection_lost(None)
    assert len(sink.calls) == n


def test_a_websocket_tunnel() -> None:
    conn, sink, _ = connection(ws_key=KEY)
    conn.data_received(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_for(KEY) + b"\r\n\r\n\x81\x00"
    )
    conn.data_received(b"\x81\x01x")
    conn.connection_lost(None)
    assert sink.calls == [
        ("first byte",),
        ("switch", 101),
        ("tunnel", b"\x81\x00"),
        ("flush",),
        ("tunnel", b"\x81\x01x"),
        ("flush",),
        ("tunnel closed",),
    ]
