"""Bodies stream both ways with bounded memory; framing, 100-continue, HEAD/204/304, keep-alive."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import pytest

from tests.helpers import (
    Pki,
    Proxy,
    Upstream,
    client_ctx,
    connect,
    read_response,
    request,
    run_proxy,
)

GIB = 1 << 30


class PeakRss:
    """Samples the proxy's RSS while a transfer runs."""

    def __init__(self, p: Proxy) -> None:
        self.p, self.base, self.peak, self._stop = p, p.rss_kb(), 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.p.rss_kb())
            time.sleep(0.05)

    def __enter__(self) -> PeakRss:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 1024


@pytest.mark.slow
def test_1gib_upload_streams_with_bounded_memory(tp: Pki, upstream: Upstream, loop: str) -> None:
    block = bytes(range(256)) * 4096  # 1 MiB
    sha = hashlib.sha256()
    with (
        run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p,
        connect(p.port, client_ctx(tp, "good"), timeout=120) as s,
        PeakRss(p) as rss,
    ):
        s.sendall(b"PUT /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % GIB)
        for _ in range(GIB // len(block)):
            s.sendall(block)
            sha.update(block)
        status, _, body = read_response(s, bytearray())
    assert status == 200
    echo = json.loads(body)
    assert echo["body_len"] == GIB and echo["body_sha256"] == sha.hexdigest()
    assert rss.growth_mb < 100, f"RSS grew {rss.growth_mb:.0f} MB"


@pytest.mark.slow
def test_1gib_download_streams_with_bounded_memory(tp: Pki, upstream: Upstream, loop: str) -> None:
    with (
        run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p,
        connect(p.port, client_ctx(tp, "good"), timeout=120) as s,
        PeakRss(p) as rss,
    ):
        s.sendall(b"GET /download?bytes=%d HTTP/1.1\r\nHost: a\r\n\r\n" % GIB)
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            buf += s.recv(65536)
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: %d" % GIB in head
        got = len(rest)
        while got < GIB:
            chunk = s.recv(1 << 20)
            assert chunk, f"closed after {got} bytes"
            got += len(chunk)
            time.sleep(0) if got % (64 << 20) else time.sleep(0.01)  # a slower reader at times
    assert got == GIB
    assert rss.growth_mb < 100, f"RSS grew {rss.growth_mb:.0f} MB"


def test_chunked_request_and_chunked_response(tp: Pki, upstream: Upstream, loop: str) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p:
        raw = (
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        status, _, body = request(p.port, client_ctx(tp, "good"), raw)
        assert status == 200 and json.loads(body)["body_len"] == 11
        status, headers, body = request(
            p.port, client_ctx(tp, "good"), b"GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n"
        )
    assert status == 200 and body == b"hello chunked world"
    assert headers["transfer-encoding"] == "chunked"
    seen = upstream.seen[0]
    assert seen.one("transfer-encoding") == "chunked" and seen.body_head == b"hello world"


def test_http10_client_gets_close_delimited_body(tp: Pki, upstream: Upstream) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}") as p:
        status, headers, body = request(
            p.port, client_ctx(tp, "good"), b"GET /chunked HTTP/1.0\r\nHost: a\r\n\r\n"
        )
    assert status == 200 and body == b"hello chunked world"
    assert "transfer-encoding" not in headers and headers["connection"] == "close"


def test_expect_100_continue_is_answered_by_the_proxy(
    tp: Pki, upstream: Upstream, loop: str
) -> None:
    with (
        run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p,
        connect(p.port, client_ctx(tp, "good")) as s,
    ):
        s.sendall(
            b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
        )
        buf = bytearray()
        assert read_response(s, buf)[0] == 100
        s.sendall(b"body")
        status, _, body = read_response(s, buf)
    assert status == 200 and json.loads(body)["body_len"] == 4
    assert upstream.seen[0].get("expect") == []


def test_denied_client_gets_no_100_continue(tp: Pki, upstream: Upstream) -> None:
    with (
        run_proxy(tp, f"http://127.0.0.1:{upstream.port}") as p,
        connect(p.port, client_ctx(tp, "other")) as s,
    ):
        s.sendall(
            b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        status, headers, _ = read_response(s, bytearray())
    assert status == 403 and headers["connection"] == "close"
    assert upstream.seen == []


def test_unknown_expectation_is_417(tp: Pki, upstream: Upstream) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}") as p:
        raw = b"POST / HTTP/1.1\r\nHost: a\r\nExpect: y\r\nContent-Length: 1\r\n\r\nZ"
        assert request(p.port, client_ctx(tp, "good"), raw)[0] == 417
    assert upstream.seen == []


def test_head_204_304(tp: Pki, upstream: Upstream, loop: str) -> None:
    with (
        run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p,
        connect(p.port, client_ctx(tp, "good")) as s,
    ):
        buf = bytearray()
        s.sendall(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, _ = read_response(s, buf, head_only=True)
        assert status == 200 and headers["content-length"] == "1234"
        s.sendall(b"GET /?status=204 HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, _ = read_response(s, buf)
        assert status == 204 and "content-length" not in headers
        s.sendall(b"GET /?status=304 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(s, buf)[0] == 304
        s.sendall(b"GET /last HTTP/1.1\r\nHost: a\r\n\r\n")  # framing stayed in sync
        status, _, body = read_response(s, buf)
        assert status == 200 and json.loads(body)["target"] == "/last"
    assert not buf


def test_keepalive_both_sides_and_pooled_upstream(tp: Pki, upstream: Upstream, loop: str) -> None:
    with (
        run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p,
        connect(p.port, client_ctx(tp, "good")) as s,
    ):
        buf = bytearray()
        for i in range(20):
            s.sendall(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
            assert read_response(s, buf)[0] == 200
        # A second client connection reuses the same pooled upstream connection.
        with connect(p.port, client_ctx(tp, "good")) as s2:
            s2.sendall(b"GET /other HTTP/1.1\r\nHost: a\r\n\r\n")
            assert read_response(s2, bytearray())[0] == 200
    assert len(upstream.seen) == 21
    assert {x.conn_id for x in upstream.seen} == {1}
    assert upstream.connections == 1
