"""The proxy's own TLS record layer (mtls_proxy/tlsconn.py): what a refused client reads, how
connections end, and what OpenSSL writes on its own (tickets, key updates) reaching the client.

Issue 14 item 3: the event loops' SSL transports closed the socket without the alert OpenSSL
had written, so clients saw "Empty reply from server"; these tests fail on that code."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import (
    Pki,
    Upstream,
    alert_name,
    client_ctx,
    connect,
    curl,
    proxy_cmd,
    read_response,
    run_proxy,
)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("tls13", [True, False])
def test_curl_prints_the_alert_of_a_refused_client(
    tp: Pki, upstream: Upstream, loop: str, tls13: bool
) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p:
        version = ["--tlsv1.3"] if tls13 else ["--tls-max", "1.2"]
        r = curl(tp, "expired", f"https://localhost:{p.port}/", "-v", *version)
    # curl 7.88, TLS 1.3: "(56) OpenSSL SSL_read: ... sslv3 alert certificate expired" (read
    # after the handshake). TLS 1.2: "(60) SSL certificate verification failed" (curl files
    # this alert under its own verification errors), with the alert in its -v trace.
    assert r.returncode == (56 if tls13 else 60), r.stderr
    assert "TLS alert, certificate expired" in r.stderr, r.stderr
    assert upstream.seen == []


def test_the_alert_arrives_although_the_client_keeps_sending(
    tp: Pki, upstream: Upstream, loop: str
) -> None:
    """A TLS 1.3 client sends its request right behind its Finished; the proxy refuses the
    certificate and must not close with that input unread (the kernel would answer with a reset
    that can overtake the alert): it shuts down its side and drops what still comes."""
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p:
        for _ in range(5):
            s = connect(p.port, client_ctx(tp, "rogue", tls13=True))
            body = b"x" * 512 * 1024
            head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
            # A reset overtaking the alert would raise ConnectionResetError instead.
            with s:
                s.sendall(head + body)
                with pytest.raises(ssl.SSLError) as refused:
                    s.recv(100)
            assert alert_name(refused.value) == "UNKNOWN_CA"
    assert upstream.seen == []


def test_a_refused_client_that_never_closes_is_dropped_after_the_linger(
    tp: Pki, upstream: Upstream
) -> None:
    """The linger after an alert is bounded: clients that hold their sockets open, reading
    nothing, do not keep the proxy's file descriptors."""
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}") as p:
        ctx = client_ctx(tp, "rogue", tls13=False)  # TLS 1.2: refused inside the handshake
        with pytest.raises(ssl.SSLError):  # warm-up: whatever the first connection opens
            connect(p.port, ctx)
        time.sleep(0.5)
        idle = open_fds(p.proc.pid)
        held = []
        for _ in range(20):
            raw = socket.create_connection(("127.0.0.1", p.port), timeout=5)
            held.append(raw.dup())  # the connection stays open when the SSL socket closes
            with pytest.raises(ssl.SSLError) as refused:
                ctx.wrap_socket(raw, server_hostname="localhost")
            assert alert_name(refused.value) == "UNKNOWN_CA"
        deadline = time.monotonic() + 5
        while open_fds(p.proc.pid) > idle and time.monotonic() < deadline:
            time.sleep(0.05)
        assert open_fds(p.proc.pid) <= idle
        for sock in held:
            sock.close()


def test_a_lingering_refused_socket_still_counts_against_max_connections(
    tp: Pki, upstream: Upstream, loop: str
) -> None:
    """Red team F3: a refused handshake gave its --max-connections slot back while its socket
    still lingered (up to a second each), so refused clients could hold more sockets than the
    cap. The slot is free when the socket is closed, as nginx counts a lingering connection."""
    with run_proxy(
        tp, f"http://127.0.0.1:{upstream.port}", "--max-connections", "1", loop=loop
    ) as p:
        ctx = client_ctx(tp, "rogue", tls13=False)
        raw = socket.create_connection(("127.0.0.1", p.port), timeout=5)
        held = raw.dup()  # open, reading nothing: the proxy lingers until its bound
        with pytest.raises(ssl.SSLError) as refused:
            ctx.wrap_socket(raw, server_hostname="localhost")
        assert alert_name(refused.value) == "UNKNOWN_CA"
        t0 = time.monotonic()
        with connect(p.port, client_ctx(tp, "good")) as s:
            waited = time.monotonic() - t0
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert read_response(s, bytearray())[0] == 200
        held.close()
    assert waited > 0.7, f"admitted after {waited:.3f} s, while the refused socket lingered"


def test_a_closing_answer_ends_with_close_notify(tp: Pki, upstream: Upstream, loop: str) -> None:
    """`Connection: close` and drains end the TLS session properly: the client reads a
    close_notify, not a truncated stream (suppress_ragged_eofs=False would raise on one)."""
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p:
        raw = socket.create_connection(("127.0.0.1", p.port), timeout=5)
        ctx = client_ctx(tp, "good")
        with ctx.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            buf = bytearray()
            assert read_response(s, buf)[0] == 200
            # b"" only after a close_notify: a bare FIN raises SSLEOFError here.
            assert s.recv(100) == b""


def test_the_readmes_troubleshooting_shows_what_curl_and_explain_print(
    tp: Pki, upstream: Upstream, tmp_path: Path
) -> None:
    """README "Troubleshooting" quotes real output: the same lines come out of curl and
    explain today (dates, hashes and paths aside)."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    quoted = section.split("$ mtls-proxy explain", 1)[1].split("```", 1)[0].splitlines()[1:]
    r = subprocess.run(
        proxy_cmd(
            "explain",
            "--client-cert",
            tp.crt("rogue"),
            *tp.material(),
            "--allow-all",
            "--upstream",
            "http://127.0.0.1:1",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 3, r.stderr
    got = r.stdout.splitlines()
    assert [x.split(":", 1)[0] for x in got] == [x.split(":", 1)[0] for x in quoted]
    assert got[-4:] == quoted[-4:]  # trust, handshake, client reads, decision: word for word
    for line in section.splitlines():
        if line.startswith("curl: (56)") and "alert unknown ca" in line:
            break
    else:
        pytest.fail("no curl line with the unknown_ca alert in the README")
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}") as p:
        out = curl(tp, "rogue", f"https://localhost:{p.port}/")
    assert out.stderr.strip() == line.strip()


def test_a_closing_response_is_whole_although_reading_was_paused(
    tp: Pki, upstream: Upstream, loop: str
) -> None:
    """Red team of tlsconn, F1: a pipelined request behind a `Connection: close` download
    pauses reading; the linger must still read (and drop) it and wait for the response to
    leave, or the final close resets the connection with megabytes unsent."""
    size = 6_000_000
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        raw.connect(("127.0.0.1", p.port))
        raw.settimeout(20)
        ctx = client_ctx(tp, "good")
        with ctx.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as s:
            s.sendall(
                b"GET /download?bytes=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % size
            )
            time.sleep(0.2)
            s.sendall(b"GET /a HTTP/1.1\r\n")  # pauses reading: nothing after a closing request
            time.sleep(0.2)
            s.sendall(b"Host: x\r\n\r\n")  # stays unread in the kernel
            buf = bytearray()
            while chunk := s.recv(16384):  # SSLEOFError without close_notify, reset: fail
                buf += chunk
                time.sleep(len(chunk) / (1024 * 1024))  # a 1 MB/s reader
    body = bytes(buf).partition(b"\r\n\r\n")[2]
    assert len(body) == size


class BioClient:
    """A TLS client on memory BIOs over a plain socket, so the test can half-close TCP (an
    SSLSocket drops its TLS state on shutdown()) and still read."""

    def __init__(self, tp: Pki, port: int) -> None:
        self.raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client_ctx(tp, "good").wrap_bio(self.inc, self.out, server_hostname="localhost")
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                data = self.raw.recv(65536)
                assert data, "the proxy closed during the handshake"
                self.inc.write(data)
        self.flush()

    def flush(self) -> None:
        if self.out.pending:
            self.raw.sendall(self.out.read())

    def read_all(self) -> bytes:
        """Everything the proxy sends until its close_notify or FIN."""
        got = bytearray()
        while True:
            try:
                chunk = self.tls.read(65536)
                if not chunk:  # the proxy's close_notify
                    return bytes(got)
                got += chunk
                continue
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return bytes(got)
            data = self.raw.recv(65536)
            if not data:
                return bytes(got)
            self.inc.write(data)


@pytest.mark.parametrize("how", ["tcp_fin", "close_notify"])
def test_a_client_that_half_closes_after_its_request_gets_the_response(
    tp: Pki, upstream: Upstream, loop: str, how: str
) -> None:
    """Red team F5: a client that sends its request and then half-closes (shutdown(SHUT_WR), or
    a TLS close_notify, which TLS 1.3 defines as a half-close) lost the response: the proxy
    closed at the client's EOF. Requests already received are answered, then the connection
    closes (HAProxy's default; the response says Connection: close)."""
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p:
        c = BioClient(tp, p.port)
        with c.raw:
            c.tls.write(b"GET /slow?s=0.3 HTTP/1.1\r\nHost: a\r\n\r\n")
            if how == "close_notify":
                with pytest.raises(ssl.SSLWantReadError):
                    c.tls.unwrap()  # writes our close_notify; the proxy's is still to come
            c.flush()
            c.raw.shutdown(socket.SHUT_WR)
            got = c.read_all()
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), got[:200]
    assert b"\r\nconnection: close" in head.lower()
    assert b'"target": "/slow?s=0.3"' in body
    records = [r for r in p.records() if r.get("msg") == "access"]
    assert [(r["status"], r.get("aborted")) for r in records] == [(200, None)]


def test_a_client_that_half_closes_inside_its_request_is_closed_and_nothing_is_forwarded(
    tp: Pki, upstream: Upstream
) -> None:
    """An incomplete request ends with the client's EOF: nothing reaches the upstream."""
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}") as p:
        c = BioClient(tp, p.port)
        with c.raw:
            c.tls.write(b"GET / HTTP/1.1\r\nHost: a\r\n")
            c.flush()
            c.raw.shutdown(socket.SHUT_WR)
            t0 = time.monotonic()
            assert c.read_all() == b""
            assert time.monotonic() - t0 < 2
    assert upstream.seen == []


def test_pipelined_requests_before_a_half_close_are_all_answered(
    tp: Pki, upstream: Upstream, loop: str
) -> None:
    """The client's FIN is acted on after every byte before it: the second request, still
    unread behind the first while that one is answered, is answered too, then the close."""
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p:
        c = BioClient(tp, p.port)
        with c.raw:
            c.tls.write(b"GET /slow?s=0.3 HTTP/1.1\r\nHost: a\r\n\r\n")
            c.tls.write(b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n")
            c.flush()
            c.raw.shutdown(socket.SHUT_WR)
            got = c.read_all()
    assert got.count(b"HTTP/1.1 200 ") == 2, got[:300]
    assert b'"target": "/second"' in got
    records = [r for r in p.records() if r.get("msg") == "access"]
    assert [(r["path"], r.get("aborted")) for r in records] == [("/slow", None), ("/second", None)]


@pytest.mark.parametrize("tail", [b"", b"GET /partial HTTP/1.1\r\nHo"])
def test_every_whole_request_before_a_half_close_is_answered_the_last_with_close(
    tp: Pki, upstream: Upstream, loop: str, tail: bytes
) -> None:
    """Red team F3: after a FIN only two of five pipelined requests were answered (the second
    said Connection: close), and a partial request after them closed the connection at once,
    although the upstream had acted on the whole ones."""
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p:
        c = BioClient(tp, p.port)
        with c.raw:
            for i in range(5):
                c.tls.write(b"GET /slow?s=0.1&n=%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
            c.tls.write(tail)
            c.flush()
            c.raw.shutdown(socket.SHUT_WR)
            got = c.read_all()
    answers = got.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 5 and all(a.startswith(b"200 ") for a in answers), got[:300]
    closes = [b"\r\nconnection: close" in a.partition(b"\r\n\r\n")[0].lower() for a in answers]
    assert closes == [False, False, False, False, True]
    assert not any(b"/partial" in bytes(raw) for raw in upstream.raw.values())
    assert len(upstream.seen) == 5
    records = [r for r in p.records() if r.get("msg") == "access"]
    assert [(r["status"], r.get("aborted")) for r in records] == [(200, None)] * 5
