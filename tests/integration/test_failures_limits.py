"""Upstream failures (502/504/mid-response close) and limits (handshake timeout, cap, 431)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import time
from pathlib import Path

from tests.helpers import (
    Pki,
    Proxy,
    Upstream,
    client_ctx,
    connect,
    get,
    read_response,
    request,
    run_proxy,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_upstream_down_is_502_json(tp: Pki, loop: str) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{free_port()}", loop=loop) as p:
        status, headers, body = get(p.port, client_ctx(tp, "good"))
        metrics = p.admin_get("/metrics")[1]
    assert status == 502 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"] == "bad_gateway"
    assert len(body) < 200
    assert 'mtls_proxy_upstream_errors_total{kind="connect"} 1.0' in metrics


def test_slow_upstream_is_504_json(tp: Pki, upstream: Upstream, loop: str) -> None:
    with run_proxy(
        tp, f"http://127.0.0.1:{upstream.port}", "--upstream-timeout", "0.5", loop=loop
    ) as p:
        t0 = time.monotonic()
        status, _, body = get(p.port, client_ctx(tp, "good"), "/slow?s=3")
        took = time.monotonic() - t0
        metrics = p.admin_get("/metrics")[1]
    assert status == 504 and json.loads(body)["error"] == "gateway_timeout"
    assert 0.4 < took < 2.5
    assert 'mtls_proxy_upstream_errors_total{kind="timeout"} 1.0' in metrics


def test_upstream_closing_mid_response_closes_the_client(
    tp: Pki, upstream: Upstream, loop: str
) -> None:
    with (
        run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p,
        connect(p.port, client_ctx(tp, "good"), timeout=5) as s,
    ):
        s.sendall(b"GET /close-mid HTTP/1.1\r\nHost: a\r\n\r\n")
        data = b""
        t0 = time.monotonic()
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (ssl.SSLError, ConnectionError):
            pass
        took = time.monotonic() - t0
    assert data.startswith(b"HTTP/1.1 200")
    assert len(data.partition(b"\r\n\r\n")[2]) == 1000  # what the upstream sent, then EOF
    assert took < 3  # closed promptly, not after a timeout


def test_malformed_upstream_response_is_502(tp: Pki, upstream: Upstream) -> None:
    upstream.raw_response = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}") as p:
        assert get(p.port, client_ctx(tp, "good"), "/raw")[0] == 502


def test_stalled_handshake_is_dropped_after_handshake_timeout(
    tp: Pki, upstream: Upstream, loop: str
) -> None:
    with run_proxy(
        tp, f"http://127.0.0.1:{upstream.port}", "--handshake-timeout", "1", loop=loop
    ) as p:
        with socket.create_connection(("127.0.0.1", p.port)) as s:
            s.settimeout(5)
            t0 = time.monotonic()
            try:
                data = s.recv(100)  # never send a ClientHello
            except ConnectionResetError:
                data = b""
            took = time.monotonic() - t0
        metrics = p.admin_get("/metrics")[1]
    assert data == b""
    assert 0.8 < took < 3
    assert 'mtls_proxy_handshakes_total{reason="timeout",result="failed"} 1.0' in metrics


def test_max_connections_holds(tp: Pki, upstream: Upstream, loop: str) -> None:
    with run_proxy(
        tp, f"http://127.0.0.1:{upstream.port}", "--max-connections", "2", loop=loop
    ) as p:
        ctx = client_ctx(tp, "good")
        a, b = connect(p.port, ctx), connect(p.port, ctx)
        for s in (a, b):
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert read_response(s, bytearray())[0] == 200
        # The third connection waits in the kernel backlog: its handshake does not complete.
        raw = socket.create_connection(("127.0.0.1", p.port))
        raw.settimeout(1.5)
        third = ctx.wrap_socket(raw, server_hostname="localhost", do_handshake_on_connect=False)
        try:
            third.do_handshake()
            raise AssertionError("the third connection was served beyond --max-connections")
        except TimeoutError:
            pass
        status = p.admin_get("/status")[1]
        assert json.loads(status)["connections_open"] == 2
        a.close()  # a slot frees: the waiting connection is now served
        third.settimeout(10)
        third.do_handshake()
        third.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(third, bytearray())[0] == 200
        third.close()
        b.close()


def test_request_head_over_max_header_bytes_is_431(tp: Pki, upstream: Upstream, loop: str) -> None:
    with run_proxy(
        tp, f"http://127.0.0.1:{upstream.port}", "--max-header-bytes", "4096", loop=loop
    ) as p:
        ctx = client_ctx(tp, "good")
        status, headers, _ = request(
            p.port, ctx, b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n"
        )
        assert status == 431 and headers["connection"] == "close"
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(600))
        assert request(p.port, ctx, b"GET / HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n")[0] == 431
        assert request(p.port, ctx, b"GET / HTTP/1.1\r\nHost: a\r\nX-Ok: 1\r\n\r\n")[0] == 200
    assert len(upstream.seen) == 1


def test_slow_request_head_gets_408_after_header_timeout(
    tp: Pki, upstream: Upstream, loop: str
) -> None:
    with (
        run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--header-timeout", "1", loop=loop) as p,
        connect(p.port, client_ctx(tp, "good")) as s,
    ):
        t0 = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")  # never finished
        status, headers, _ = read_response(s, bytearray())
        took = time.monotonic() - t0
    assert status == 408 and headers["connection"] == "close"
    assert 0.7 < took < 3
    assert upstream.seen == []


def test_idle_keepalive_connection_is_closed_after_idle_timeout(
    tp: Pki, upstream: Upstream
) -> None:
    with (
        run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--idle-timeout", "1") as p,
        connect(p.port, client_ctx(tp, "good")) as s,
    ):
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(s, bytearray())[0] == 200
        t0 = time.monotonic()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            assert s.recv(100) == b""
        assert 0.7 < time.monotonic() - t0 < 3


def _sockets(p: Proxy) -> int:
    n = 0
    for fd in Path(f"/proc/{p.proc.pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed while we look
            n += os.readlink(fd).startswith("socket:")
    return n


def _wait_record(p: Proxy, timeout: float) -> dict[str, object] | None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for rec in p.records():
            if rec.get("msg") == "access":
                return rec
        time.sleep(0.05)
    return None


def test_a_client_that_stops_reading_is_cut_after_send_timeout(
    tp: Pki, upstream: Upstream, loop: str
) -> None:
    """Red team F2: a client that stops reading mid-response held its connection and an
    upstream connection forever (the upstream deadline is off while we stop reading it).
    Like nginx's send_timeout, S seconds in which the client takes no byte close both."""
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--send-timeout", "1", loop=loop) as p:
        before = _sockets(p)
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        raw.connect(("127.0.0.1", p.port))
        with client_ctx(tp, "good").wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"GET /download?bytes=200000000 HTTP/1.1\r\nHost: a\r\n\r\n")
            t0 = time.monotonic()
            rec = _wait_record(p, 10)  # the record is written when the exchange ends
            took = time.monotonic() - t0
            assert rec is not None, "never cut:\n" + "".join(p.logs[-5:])
            assert rec["aborted"] is True and rec["status"] == 200
            assert rec["reason"] == "send timeout: the client took no response byte for 1.0 s"
            assert 0.9 < took < 5
            # The connection is gone: reading drains what was buffered, then ends.
            s.settimeout(5)
            got = 0
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                while chunk := s.recv(1 << 20):
                    got += len(chunk)
            assert got < 200_000_000
        # The upstream connection was closed too (not pooled: its response was cut short).
        end = time.monotonic() + 3
        while _sockets(p) != before and time.monotonic() < end:
            time.sleep(0.05)
        assert _sockets(p) == before
        assert p.metric("mtls_proxy_connections_open") == 0


def test_a_slow_but_steady_reader_is_not_cut_by_send_timeout(tp: Pki, upstream: Upstream) -> None:
    """--send-timeout bounds the time between two bytes the client takes, not the response:
    a 3 MB download read at 1 MB/s outlasts a 1 s send timeout and is whole."""
    size = 3_000_000
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--send-timeout", "1") as p:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        raw.connect(("127.0.0.1", p.port))
        with client_ctx(tp, "good").wrap_socket(raw, server_hostname="localhost") as s:
            s.settimeout(10)
            s.sendall(b"GET /download?bytes=%d HTTP/1.1\r\nHost: a\r\n\r\n" % size)
            t0 = time.monotonic()
            buf = bytearray()
            while b"\r\n\r\n" not in buf or len(buf) - buf.index(b"\r\n\r\n") - 4 < size:
                chunk = s.recv(65536)
                assert chunk, "the proxy cut a client that was reading"
                buf += chunk
                time.sleep(len(chunk) / 1e6)  # about 1 MB/s
        assert time.monotonic() - t0 > 2  # it did outlast the send timeout
    assert buf.startswith(b"HTTP/1.1 200 ")
    assert _wait_record(p, 5) is not None
    assert [r.get("aborted") for r in p.records() if r.get("msg") == "access"] == [None]
