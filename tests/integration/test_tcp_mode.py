"""serve --mode tcp (docs/tcp.md): real mTLS clients -> the proxy -> a recording TCP upstream, a
real Redis server, and PROXY v2 headers decoded by an independent parser (proxy-protocol)."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from proxyprotocol.v2 import ProxyProtocolV2

from tests.helpers import Pki, Proxy, client_ctx, connect, run_proxy, serve_raw

HEADER_LEN_AT = 14  # the v2 header's length field


@dataclass
class TcpUpstream:
    """Echoes upper-cased bytes (after a PROXY v2 header, when one comes); on the client's EOF
    answers the byte count and closes. Records what each connection received."""

    port: int = 0
    raw: list[bytearray] = field(default_factory=list)


def _serve(up: TcpUpstream, sock: socket.socket) -> None:
    got = bytearray()
    up.raw.append(got)
    skipped = False
    with sock:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            got += data
            if not skipped and got.startswith(b"\r\n\r\n\x00\r\nQUIT\n"):
                if len(got) < 16:
                    continue
                n = 16 + int.from_bytes(got[HEADER_LEN_AT:16], "big")
                if len(got) < n:
                    continue
                data, skipped = bytes(got[n:]), True
            skipped = True
            if data:
                sock.sendall(data.upper())
        sock.sendall(b"bytes=%d" % len(got))


@pytest.fixture
def tcp_up() -> Iterator[TcpUpstream]:
    up = TcpUpstream()
    listener = serve_raw(lambda sock, _n: _serve(up, sock))
    up.port = listener.getsockname()[1]
    yield up
    listener.close()


def _tcp_proxy(tp: Pki, port: int, *extra: str) -> Iterator[Proxy]:
    return run_proxy(tp, f"tcp://127.0.0.1:{port}", "--mode", "tcp", *extra)  # type: ignore[return-value]


def _read_until_closed(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            data = s.recv(65536)
        except (OSError, ConnectionError):
            return out
        if not data:
            return out
        out += data


def test_bytes_both_ways_with_a_half_close(tp: Pki, tcp_up: TcpUpstream) -> None:
    with _tcp_proxy(tp, tcp_up.port) as p:
        s = connect(p.port, client_ctx(tp, "good"))
        s.sendall(b"hello ")
        assert s.recv(100) == b"HELLO "
        s.sendall(b"world")
        assert s.recv(100) == b"WORLD"
        # A TCP FIN under the TLS session (SSLSocket.shutdown would drop the session): the
        # proxy passes it on as the upstream's EOF.
        socket.socket.shutdown(s, socket.SHUT_WR)
        assert _read_until_closed(s) == b"bytes=11"  # the upstream still answered
        s.close()
        records = _wait_records(p, 1)
    assert records[0]["status"] == 200 and records[0]["decision"] == "allow"
    assert (records[0]["bytes_in"], records[0]["bytes_out"]) == (11, 19)
    assert records[0]["protocol"] == "tcp"
    assert bytes(tcp_up.raw[0]) == b"hello world"  # --proxy-protocol off: nothing before


def _wait_records(p: Proxy, n: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 5
    while True:
        records = [r for r in p.records() if r.get("msg") == "access"]
        if len(records) >= n or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def test_denied_client_gets_no_byte_through(tp: Pki, tcp_up: TcpUpstream) -> None:
    with _tcp_proxy(tp, tcp_up.port) as p:
        s = connect(p.port, client_ctx(tp, "other"))
        with contextlib.suppress(OSError):
            s.sendall(b"FLUSHALL\r\n")
        assert _read_until_closed(s) == b""
        s.close()
        records = _wait_records(p, 1)
        denied = p.metric('mtls_proxy_requests_total{code="4xx",decision="deny"')
    assert tcp_up.raw == []  # never connected
    assert records[0]["status"] == 403 and records[0]["decision"] == "deny"
    assert denied == 1


@pytest.mark.parametrize("mode", ["conn", "tls", "tls-full"])
def test_proxy_protocol_v2_header(tp: Pki, tcp_up: TcpUpstream, mode: str) -> None:
    with _tcp_proxy(tp, tcp_up.port, "--proxy-protocol", mode) as p:
        s = connect(p.port, client_ctx(tp, "good"))
        client_port = s.getsockname()[1]
        s.sendall(b"x")
        assert s.recv(10) == b"X"
        s.close()
        deadline = time.monotonic() + 5
        while not tcp_up.raw and time.monotonic() < deadline:
            time.sleep(0.02)
    r = ProxyProtocolV2().unpack(bytes(tcp_up.raw[0]))
    assert (str(r.source[0]), r.source[1]) == ("127.0.0.1", client_port)
    assert (str(r.dest[0]), r.dest[1]) == ("127.0.0.1", p.port)
    tlv = r.tlv
    if mode == "conn":
        assert tlv.get(0x20) is None and tlv.authority is None  # addresses only
        return
    assert tlv.authority == "localhost"  # the SNI the client sent
    assert tlv.ssl.has_ssl and tlv.ssl.has_cert_conn and tlv.ssl.verified
    assert tlv.ssl.version in ("TLSv1.3", "TLSv1.2")
    if mode == "tls":
        assert tlv.ssl.cn is None and tlv.ssl.get(0x28) is None
    else:
        assert tlv.ssl.cn == "client-good"
        assert tlv.ssl.get(0x28) == tp.der("good")


def test_large_transfer_is_byte_exact(tp: Pki, tcp_up: TcpUpstream) -> None:
    """8 MiB through, 256 KiB at a time, each piece read back before the next (one thread: an
    SSLSocket is not for concurrent reads and writes)."""
    payload = bytes(range(256)) * (8 * 4096)
    got = bytearray()
    with _tcp_proxy(tp, tcp_up.port) as p:
        s = connect(p.port, client_ctx(tp, "good"), timeout=60)
        for i in range(0, len(payload), 256 * 1024):
            s.sendall(payload[i : i + 256 * 1024])
            while len(got) < min(i + 256 * 1024, len(payload)):
                got += s.recv(1 << 20)
        s.close()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload.upper()).digest()


def test_upstream_down_closes_and_is_counted(tp: Pki) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    with _tcp_proxy(tp, port) as p:
        s = connect(p.port, client_ctx(tp, "good"))
        assert _read_until_closed(s) == b""
        records = _wait_records(p, 1)
        errors = p.metric('mtls_proxy_upstream_errors_total{kind="connect"}')
    assert records[0]["status"] == 502 and errors == 1


@pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server: .ci/run installs it"
)
def test_redis_behind_the_proxy(tp: Pki, tmp_path: object) -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    rport = free.getsockname()[1]
    free.close()
    redis = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(rport),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", rport), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        with _tcp_proxy(tp, rport) as p:
            s = connect(p.port, client_ctx(tp, "good"))
            s.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nvalue\r\n")
            assert s.recv(100) == b"+OK\r\n"
            s.sendall(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
            assert s.recv(100) == b"$5\r\nvalue\r\n"
            s.close()
    finally:
        redis.terminate()
        redis.wait(10)
