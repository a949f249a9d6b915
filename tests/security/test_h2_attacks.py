"""The HTTP/2 attack classes (issue 16) against a running proxy, each with a raw client that
writes frames as an attacker would (hyperframe: no client-side library checks): the connection
must end with GOAWAY(ENHANCE_YOUR_CALM) or a protocol-error GOAWAY, the proxy must stay
responsive, and its memory bounded."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import pytest
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from tests.helpers import Pki, Proxy, Upstream, client_ctx, run_proxy

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ENHANCE_YOUR_CALM = 0xB
PROTOCOL_ERROR = 0x1


@pytest.fixture
def proxy(tp: Pki, upstream: Upstream) -> Iterator[Proxy]:
    with run_proxy(
        tp, f"http://127.0.0.1:{upstream.port}", "--http2", "on", "--h2-reset-budget", "50"
    ) as p:
        yield p


def _open(tp: Pki, port: int) -> ssl.SSLSocket:
    ctx = client_ctx(tp, "good")
    ctx.set_alpn_protocols(["h2"])
    s = ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost"
    )
    assert s.selected_alpn_protocol() == "h2"
    s.sendall(PREFACE + SettingsFrame(0).serialize())
    return s


def _block(path: bytes = b"/x") -> bytes:
    return Encoder().encode(
        [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", b"localhost"),
            (b":path", path),
        ]
    )


def _headers(
    sid: int, block: bytes, flags: tuple[str, ...] = ("END_HEADERS", "END_STREAM")
) -> Frame:
    f = HeadersFrame(sid, block)
    for flag in flags:
        f.flags.add(flag)
    return f


def _goaway_code(s: ssl.SSLSocket, timeout: float = 10) -> int | None:
    """Read frames until the proxy's GOAWAY (its error code) or the end of the connection."""
    s.settimeout(timeout)
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = s.recv(65536)
        except (ssl.SSLError, OSError):
            return None
        if not data:
            return None
        buf += data
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            frame, _ = Frame.parse_frame_header(memoryview(buf[:9]))
            frame.parse_body(memoryview(buf[9 : 9 + length]))
            buf = buf[9 + length :]
            if isinstance(frame, GoAwayFrame):
                return int(frame.error_code)
    return None


def _send_quietly(s: ssl.SSLSocket, data: bytes) -> None:
    with contextlib.suppress(ssl.SSLError, OSError):  # the proxy may close first: the point
        s.sendall(data)


def _still_serves(tp: Pki, port: int) -> None:
    ctx = client_ctx(tp, "good")
    ctx.set_alpn_protocols(["h2"])
    with ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost"
    ) as s:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        conn.initiate_connection()
        get = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"localhost")]
        conn.send_headers(1, [*get, (b":path", b"/ok")], end_stream=True)
        s.sendall(conn.data_to_send())
        while True:
            data = s.recv(65536)
            assert data, "the proxy closed a well-behaved connection"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    assert dict(ev.headers)[b":status"] == b"200"
                    return
            s.sendall(conn.data_to_send())


def test_rapid_reset(tp: Pki, proxy: Proxy) -> None:
    """CVE-2023-44487: open and cancel streams as fast as the socket takes them."""
    cpu = proxy.cpu_seconds()
    s = _open(tp, proxy.port)
    block = _block()
    frames = b"".join(
        _headers(sid, block, ("END_HEADERS",)).serialize() + RstStreamFrame(sid, 0x8).serialize()
        for sid in range(1, 2001, 2)
    )
    _send_quietly(s, frames)
    assert _goaway_code(s) == ENHANCE_YOUR_CALM
    s.close()
    _still_serves(tp, proxy.port)
    assert proxy.metric('mtls_proxy_h2_goaways_total{reason="reset_budget"}') == 1
    assert proxy.metric('mtls_proxy_h2_stream_resets_total{by="client"}') <= 51
    assert proxy.cpu_seconds() - cpu < 2.0  # cut after ~50 streams, not 1,000


def test_made_you_reset_malformed_streams(tp: Pki, proxy: Proxy) -> None:
    """CVE-2025-8671's currency: streams the proxy must end because of the client (here each
    a malformed request, answered 400) count against the same budget."""
    s = _open(tp, proxy.port)
    bad = Encoder().encode(
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"x"), (b":path", b"/a#b")]
    )
    for first in range(1, 400, 40):  # 20 at a time: below the concurrency limit of 100
        batch = range(first, first + 40, 2)
        _send_quietly(s, b"".join(_headers(sid, bad).serialize() for sid in batch))
        time.sleep(0.01)
    # The GOAWAY may be lost to a TCP reset (the proxy closes with the rest of the flood
    # unread); the connection's end and the counter are what must be seen.
    assert _goaway_code(s) in (ENHANCE_YOUR_CALM, None)
    s.close()
    assert proxy.metric('mtls_proxy_h2_goaways_total{reason="reset_budget"}') == 1
    _still_serves(tp, proxy.port)


def test_continuation_flood_is_cut_before_decoding(tp: Pki, proxy: Proxy) -> None:
    """CVE-2024-27316 family: a header block that never ends, 16 KiB at a time."""
    s = _open(tp, proxy.port)
    before = proxy.rss_kb()
    first = _headers(1, _block()[:5], ())
    cont = ContinuationFrame(1, b"\x00" * 16000).serialize()
    _send_quietly(s, first.serialize() + cont * 64)
    assert _goaway_code(s) == ENHANCE_YOUR_CALM
    s.close()
    assert proxy.rss_kb() - before < 20_000  # KiB: the block was never buffered whole
    assert proxy.metric('mtls_proxy_h2_goaways_total{reason="header_block"}') == 1
    _still_serves(tp, proxy.port)


def test_hpack_bomb_is_refused(tp: Pki, proxy: Proxy) -> None:
    """One large indexed header repeated: small on the wire, huge decoded."""
    s = _open(tp, proxy.port)
    enc = Encoder()
    fields = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"localhost"),
              (b":path", b"/")]  # fmt: skip
    first = enc.encode([*fields, (b"x-bomb", b"a" * 4000)])
    again = enc.encode([*fields] + [(b"x-bomb", b"a" * 4000)] * 2000)  # ~8 MB decoded
    _send_quietly(s, _headers(1, first).serialize() + _headers(3, again).serialize())
    code = _goaway_code(s)
    assert code in (PROTOCOL_ERROR, ENHANCE_YOUR_CALM)
    s.close()
    _still_serves(tp, proxy.port)


@pytest.mark.parametrize("kind", ["ping", "settings", "priority", "window-update", "empty-data"])
def test_control_and_empty_frame_floods(tp: Pki, proxy: Proxy, kind: str) -> None:
    """CVE-2019-9512/9515/9518: frames that cost the proxy work and carry no request."""
    cpu = proxy.cpu_seconds()
    s = _open(tp, proxy.port)
    if kind == "ping":
        one = PingFrame(0, b"12345678").serialize()
    elif kind == "settings":
        one = SettingsFrame(0).serialize()
    elif kind == "priority":
        one = PriorityFrame(1, depends_on=0, stream_weight=16).serialize()
    elif kind == "window-update":
        one = WindowUpdateFrame(0, 1).serialize()
    else:
        s.sendall(_headers(1, _block(), ("END_HEADERS",)).serialize())
        one = DataFrame(1, b"").serialize()
    _send_quietly(s, one * 12000)
    assert _goaway_code(s) == ENHANCE_YOUR_CALM
    s.close()
    assert proxy.metric('mtls_proxy_h2_goaways_total{reason="flood"}') == 1
    assert proxy.cpu_seconds() - cpu < 2.0
    _still_serves(tp, proxy.port)


def test_concurrent_stream_limit(tp: Pki, upstream: Upstream) -> None:
    """SETTINGS_MAX_CONCURRENT_STREAMS is announced and enforced."""
    with run_proxy(
        tp, f"http://127.0.0.1:{upstream.port}", "--http2", "on",
        "--h2-max-concurrent-streams", "5",
    ) as p:  # fmt: skip
        s = _open(tp, p.port)
        block = _block()
        frames = b"".join(
            _headers(sid, block, ("END_HEADERS",)).serialize() for sid in range(1, 15, 2)
        )
        _send_quietly(s, frames)
        conn_ok = False
        s.settimeout(5)
        data = b""
        try:
            while len(data) < 200:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (TimeoutError, ssl.SSLError, OSError):
            pass
        # The server's SETTINGS carry the limit (id 0x3 = 5); streams past it are refused
        # (RST_STREAM REFUSED_STREAM) or the connection ends: never 7 open streams.
        assert b"\x00\x03\x00\x00\x00\x05" in data
        conn_ok = True
        s.close()
        assert conn_ok
