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
        r = subprocess.run(
            [
                "curl",
                "-sSv",
                *version,
                "--cacert",
                tp.ca,
                "--cert",
                tp.crt("expired"),
                "--key",
                tp.key("expired"),
                f"https://localhost:{p.port}/",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
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
            "--cert",
            tp.crt("server"),
            "--key",
            tp.key("server"),
            "--cacert",
            tp.ca,
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
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "--cacert",
                tp.ca,
                "--cert",
                tp.crt("rogue"),
                "--key",
                tp.key("rogue"),
                f"https://localhost:{p.port}/",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
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
