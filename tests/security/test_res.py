"""docs/security.md, RES: resource exhaustion, timeouts, upstream failure, shutdown (RES-01 ..
RES-30), against a proxy with short deadlines (1.5 s) so that every case is bounded in time.

Elsewhere: RES-08's 10,000 idle connections in bench/idle.sh; the max-connections cap in
tests/integration/test_failures_limits.py::test_max_connections_holds (RES-08); RES-09 line and
field limits as SMG-064/065; 1 GiB up and down with bounded memory in
tests/integration/test_streaming.py (RES-10, RES-11); RES-13 502, RES-14 504 and RES-16 (upstream
closes mid-body) in test_failures_limits.py; RES-19 as SMG-054; RES-22 and RES-24 drains in
test_lifecycle_admin.py; RES-29 as TLS-033."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtls_proxy.cli import pki
from tests.helpers import (
    Pki,
    Proxy,
    Upstream,
    client_ctx,
    connect,
    get,
    read_response,
    run_proxy,
    run_upstream,
    serve_raw,
)

T = 1.5  # every deadline of the rig


@pytest.fixture(scope="module")
def short(tp: Pki) -> Iterator[tuple[Proxy, Upstream]]:
    with (
        run_upstream() as up,
        run_proxy(
            tp,
            f"http://127.0.0.1:{up.port}",
            *("--handshake-timeout", str(T), "--header-timeout", str(T)),
            *("--idle-timeout", str(T), "--body-timeout", str(T), "--upstream-timeout", str(T)),
        ) as p,
    ):
        yield p, up


def closed_after(s: socket.socket, limit: float) -> tuple[float, bytes]:
    """Seconds until the peer closed *s* (reading whatever it sent), at most *limit*."""
    t0 = time.monotonic()
    s.settimeout(limit)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionError, ssl.SSLError):
        pass
    return time.monotonic() - t0, data


def test_res01_silent_tcp_is_closed_at_the_handshake_timeout(short: tuple[Proxy, Upstream]) -> None:
    p, _ = short
    before = p.metric('mtls_proxy_handshakes_total{reason="timeout"')
    with socket.create_connection(("127.0.0.1", p.port)) as s:
        took, _ = closed_after(s, 10)
    assert T - 0.3 < took < T + 1.0
    assert p.metric('mtls_proxy_handshakes_total{reason="timeout"') == before + 1


def test_res02_a_trickled_client_hello_has_the_same_total_deadline(
    short: tuple[Proxy, Upstream],
) -> None:
    p, _ = short
    with socket.create_connection(("127.0.0.1", p.port)) as s:
        t0 = time.monotonic()
        s.sendall(b"\x16\x03\x01\x02\x00")  # a ClientHello record header
        for _ in range(8):
            time.sleep(0.4)
            try:
                s.sendall(b"\x01")
            except OSError:
                break
        took, _ = closed_after(s, 10)
    assert time.monotonic() - t0 < T + 1.5 and took < T + 1.0


def test_res03_a_handshake_flood_does_not_starve_good_clients(
    tp: Pki, short: tuple[Proxy, Upstream]
) -> None:
    p, _ = short
    base = p.metric("mtls_proxy_connections_open")
    silent = [socket.create_connection(("127.0.0.1", p.port)) for _ in range(200)]
    garbage = []
    for _ in range(100):
        g = socket.create_connection(("127.0.0.1", p.port))
        g.sendall(os.urandom(300))
        garbage.append(g)
    try:
        ctx = client_ctx(tp, "good")
        for _ in range(10):
            t0 = time.monotonic()
            assert get(p.port, ctx)[0] == 200
            assert time.monotonic() - t0 < 1.0
    finally:
        for s in silent + garbage:
            s.close()
    time.sleep(T + 0.5)
    assert p.metric("mtls_proxy_connections_open") == base


def test_res04_res07_no_request_and_keepalive_idle_are_closed(
    tp: Pki, short: tuple[Proxy, Upstream]
) -> None:
    p, _ = short
    with connect(p.port, client_ctx(tp, "good")) as s:
        took, _ = closed_after(s, 10)  # RES-04: a handshake, then nothing
    assert took < T + 1.0
    with connect(p.port, client_ctx(tp, "good")) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(s, bytearray())[0] == 200
        took, _ = closed_after(s, 10)  # RES-07: idle after a response
    assert took < T + 1.0


def test_res05_slowloris_headers_get_408_and_nothing_upstream(
    tp: Pki, short: tuple[Proxy, Upstream]
) -> None:
    p, up = short
    before = len(up.seen)
    with connect(p.port, client_ctx(tp, "good")) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")
        t0 = time.monotonic()
        for ch in b"X-Slow: abcdefgh":
            try:
                s.sendall(bytes((ch,)))
            except OSError:
                break
            time.sleep(0.3)
            if time.monotonic() - t0 > T + 1:
                break
        _, data = closed_after(s, 5)
    assert data == b"" or data.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - t0 < T + 2.5 and len(up.seen) == before


def test_res06_slow_body_gets_408_and_the_upstream_connection_is_dropped(
    tp: Pki, short: tuple[Proxy, Upstream]
) -> None:
    p, up = short
    before, conns = len(up.seen), up.connections
    with connect(p.port, client_ctx(tp, "good")) as s:
        s.sendall(b"POST /slow-body HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n")
        for _ in range(3):
            s.sendall(b"x" * 10)
            time.sleep(0.5)  # bytes keep coming: the deadline is per silence, not total
        _, data = closed_after(s, 10)
    assert data.startswith(b"HTTP/1.1 408")
    assert len(up.seen) == before  # the upstream never saw a complete request
    assert get(p.port, client_ctx(tp, "good"))[0] == 200
    assert up.connections > conns  # a fresh upstream connection: the aborted one was not reused


def test_res15_upstream_stalling_mid_body_aborts_the_client(
    tp: Pki, short: tuple[Proxy, Upstream]
) -> None:
    del short
    stall = threading.Event()

    def serve(conn: socket.socket, _: int) -> None:
        # Headers, a few body bytes, then silence, holding the socket.
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        stall.wait(15)
        conn.close()

    srv = serve_raw(serve)
    port = srv.getsockname()[1]
    try:
        with run_proxy(tp, f"http://127.0.0.1:{port}", "--upstream-timeout", str(T)) as q:
            with connect(q.port, client_ctx(tp, "good")) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                took, data = closed_after(s, 10)
            assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"partial")
            assert took < T + 1.5  # aborted at the upstream read deadline, never completed
            assert q.metric('mtls_proxy_upstream_errors_total{kind="timeout"}') == 1
    finally:
        stall.set()
        srv.close()


def test_res17_resetting_upstream_gets_502_and_no_retry(tp: Pki) -> None:
    seen: list[bytes] = []

    def serve(conn: socket.socket, _: int) -> None:
        seen.append(conn.recv(65536))
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()  # RST

    srv = serve_raw(serve)
    port = srv.getsockname()[1]
    try:
        with run_proxy(tp, f"http://127.0.0.1:{port}") as p:
            with connect(p.port, client_ctx(tp, "good")) as s:
                s.sendall(b"POST /pay HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
                status = read_response(s, bytearray())[0]
            assert status == 502
            assert len([r for r in seen if r.startswith(b"POST /pay")]) == 1  # at most once
    finally:
        srv.close()


def test_res20_compressed_request_bodies_are_forwarded_as_is(
    tp: Pki, short: tuple[Proxy, Upstream]
) -> None:
    p, _up = short
    bomb = gzip.compress(b"\0" * 20_000_000)
    with connect(p.port, client_ctx(tp, "good")) as s:
        s.sendall(
            b"POST /bomb HTTP/1.1\r\nHost: a\r\nContent-Encoding: gzip\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(bomb) + bomb
        )
        status, _, body = read_response(s, bytearray())
    assert status == 200
    echo = json.loads(body)
    assert echo["body_len"] == len(bomb) and echo["body_sha256"] == hashlib.sha256(bomb).hexdigest()


def test_res21_metric_series_do_not_grow_with_identities(
    tp: Pki, short: tuple[Proxy, Upstream], tmp_path: Path
) -> None:
    p, _ = short
    get(p.port, client_ctx(tp, "good"))
    series = len([ln for ln in p.admin_get("/metrics")[1].splitlines() if not ln.startswith("#")])
    inter = pki.load_issuer(tp.dir)
    for i in range(20):
        leaf = pki.issue(
            inter, "client", f"distinct-{i}", uris=[f"spiffe://test.local/ns/x/sa/s{i}"]
        )
        pki.write_pair(tmp_path, f"c{i}", leaf)
        ctx = ssl.create_default_context(cafile=tp.ca)
        ctx.load_cert_chain(tmp_path / f"c{i}.crt", tmp_path / f"c{i}.key")
        assert get(p.port, ctx)[0] == 403
    text = p.admin_get("/metrics")[1]
    after = len([ln for ln in text.splitlines() if not ln.startswith("#")])
    assert after <= series + 1  # at most the new decision="deny",code="4xx" series
    assert "distinct-" not in text and "spiffe://" not in text


def test_res23_res25_res27_drain(tp: Pki, upstream: Upstream) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--shutdown-grace", "5") as p:
        idle = connect(p.port, client_ctx(tp, "good"))
        idle.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(idle, bytearray())[0] == 200
        busy = connect(p.port, client_ctx(tp, "good"))
        busy.sendall(b"GET /slow?s=1 HTTP/1.1\r\nHost: a\r\n\r\n")
        time.sleep(0.2)
        half = socket.create_connection(("127.0.0.1", p.port))  # RES-25: mid-handshake
        half.sendall(b"\x16\x03\x01\x02\x00\x01")
        t0 = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        took, _ = closed_after(idle, 5)  # RES-23: idle keep-alive closed promptly
        assert took < 1.0
        p.proc.send_signal(signal.SIGHUP)  # RES-27: no reload re-opens anything
        status, headers, _ = read_response(busy, bytearray())
        assert status == 200 and headers.get("connection") == "close"  # answered, then closed
        assert p.proc.wait(10) == 0 and time.monotonic() - t0 < 4
        assert not any("Traceback" in line for line in p.logs)
        assert not any('"reloaded"' in line for line in p.logs)
        for s in (idle, busy, half):
            s.close()


def test_res26_a_second_sigterm_during_drain_is_harmless(tp: Pki, upstream: Upstream) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--shutdown-grace", "3") as p:
        busy = connect(p.port, client_ctx(tp, "good"))
        busy.sendall(b"GET /slow?s=1 HTTP/1.1\r\nHost: a\r\n\r\n")
        time.sleep(0.2)
        p.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        p.proc.send_signal(signal.SIGINT)
        assert read_response(busy, bytearray())[0] == 200
        assert p.proc.wait(10) == 0
        assert not any("Traceback" in line for line in p.logs)
        busy.close()


def test_res28_metrics_load_does_not_disturb_the_data_plane(
    tp: Pki, short: tuple[Proxy, Upstream]
) -> None:
    p, _ = short
    stop = threading.Event()
    scrapes = [0]

    def hammer() -> None:
        while not stop.is_set():
            assert p.admin_get("/metrics")[0] == 200
            scrapes[0] += 1

    t = threading.Thread(target=hammer)
    t.start()
    try:
        ctx = client_ctx(tp, "good")
        with connect(p.port, ctx) as s:
            buf = bytearray()
            for _ in range(100):
                t0 = time.monotonic()
                s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                assert read_response(s, buf)[0] == 200
                assert time.monotonic() - t0 < 0.5
    finally:
        stop.set()
        t.join()
    assert scrapes[0] > 10


def test_res30_log_lines_stay_single_lines(tp: Pki, upstream: Upstream) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--allow-all") as p:
        for name in ("evil", "quote"):
            assert get(p.port, client_ctx(tp, name))[0] == 200
        assert get(p.port, client_ctx(tp, "good"), "/a%0d%0aX-Injected:%20yes")[0] == 200
        time.sleep(0.2)
    for line in p.logs:
        assert line.endswith("\n") and line.count("\n") == 1
        assert "\u202e" not in line and "\r" not in line
        json.loads(line)
    access = [json.loads(ln) for ln in p.logs if '"access"' in ln]
    assert any(r["peer"] == "CN=evil\\0D\\0AX-Client-Subject: CN=admin" for r in access)


def test_res24_stuck_connection_is_force_closed_at_the_grace(tp: Pki, upstream: Upstream) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", "--shutdown-grace", "1") as p:
        s = connect(p.port, client_ctx(tp, "good"))
        s.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nx")  # never finishes
        time.sleep(0.2)
        t0 = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(10) == 0  # docs/cli.md, Signals: exit 0 after the grace period
        assert time.monotonic() - t0 < 3
        s.close()


def test_res08_many_idle_connections_keep_the_proxy_responsive(
    tp: Pki, short: tuple[Proxy, Upstream]
) -> None:
    p, _ = short
    ctx = client_ctx(tp, "good")
    held = [connect(p.port, ctx) for _ in range(300)]
    try:
        t0 = time.monotonic()
        assert get(p.port, ctx)[0] == 200
        assert time.monotonic() - t0 < 1.0
    finally:
        for s in held:
            s.close()
