"""Red team of `mtls-proxy client` (docs/egress.md; core/egress.py, core/tunnelproto.py,
dataplane/dialer.py, dataplane/egress.py, dataplane/egress_http.py, server/egress.py), from
outside: real `client` processes, hostile TLS remotes, proxies and local apps on 127.0.0.1.

Findings are numbered E1, E2, ...: each test failed before its fix (a strict xfail, with the
reason, where no fix was made); the tests without a number document what held."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mtls_proxy.core.egress import load_client_config
from tests.helpers import ALLOWED_URI, Pki, Proxy, proxy_cmd, run_proxy, run_upstream, serve_raw
from tests.integration.test_egress import OTHER_URI, _echo, _talk, _wait, run_client


# -- hostile remotes ---------------------------------------------------------------------------
@dataclass
class Remote:
    """A TLS remote run by *behave(tls_socket, record)*; what each connection received."""

    port: int
    got: list[bytearray] = field(default_factory=list)
    raw_conns: list[socket.socket] = field(default_factory=list)


@contextlib.contextmanager
def tls_remote(
    tp: Pki, behave: Callable[[ssl.SSLSocket, bytearray], None], cert: str = "server"
) -> Iterator[Remote]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tp.crt(cert), tp.key(cert))
    ctx.load_verify_locations(tp.ca)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    holder: list[Remote] = []

    def handle(sock: socket.socket, _n: int) -> None:
        rec = bytearray()
        holder[0].got.append(rec)
        holder[0].raw_conns.append(sock)
        with contextlib.suppress(OSError), ctx.wrap_socket(sock, server_side=True) as t:
            behave(t, rec)

    srv = serve_raw(handle)
    holder.append(Remote(srv.getsockname()[1]))
    try:
        yield holder[0]
    finally:
        srv.close()


def record_all(t: ssl.SSLSocket, rec: bytearray) -> None:
    t.settimeout(10)
    with contextlib.suppress(OSError):
        while data := t.recv(65536):
            rec += data


def silent_server() -> tuple[socket.socket, list[socket.socket]]:
    """Accepts TCP connections and never says a word."""
    lst = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                s, _ = lst.accept()
            except OSError:
                return
            conns.append(s)

    threading.Thread(target=accept, daemon=True).start()
    return lst, conns


def still_open(s: socket.socket) -> bool:
    """The peer has neither closed nor reset *s* (what it sent is drained)."""
    s.setblocking(False)
    try:
        while s.recv(65536):
            pass
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def reset(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


@pytest.fixture
def echo_serve(tp: Pki) -> Iterator[Proxy]:
    """serve --mode tcp in front of an upper-casing echo, allowing both client identities."""
    seen: list[bytes] = []
    srv = serve_raw(lambda s, n: _echo(s, n, seen))
    try:
        with run_proxy(
            tp,
            f"tcp://127.0.0.1:{srv.getsockname()[1]}",
            "--mode",
            "tcp",
            "--allow-uri",
            ALLOWED_URI,
            "--allow-uri",
            OTHER_URI,
        ) as p:
            yield p
    finally:
        srv.close()


# -- E1: a session kept from before a reload -----------------------------------------------------
@pytest.mark.parametrize("mode", ["l4", "http"])
def test_e1_a_connection_closed_after_a_reload_does_not_poison_later_dials(
    tp: Pki, tmp_path: Path, mode: str
) -> None:
    """E1 (high, availability): a connection made before a certificate rotation and closed
    after it stored its TLS session (of the old SSLContext) as the one to resume; Python refuses
    it for the new context (ValueError in connection_made), so every later dial timed out, until
    the next rotation: a routine cert-manager renewal cut all egress. (--http: the old pool's
    retirement after --shutdown-grace does the same.)"""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(tp.crt("good"), cert)
    shutil.copy(tp.key("good"), key)
    extra = ("--cert", str(cert), "--key", str(key), "--connect-timeout", "3")
    with contextlib.ExitStack() as stack:
        if mode == "l4":
            seen: list[bytes] = []
            srv = serve_raw(lambda s, n: _echo(s, n, seen))
            stack.callback(srv.close)
            up = f"tcp://127.0.0.1:{srv.getsockname()[1]}"
            serve = stack.enter_context(
                run_proxy(
                    tp, up, "--mode", "tcp", "--allow-uri", ALLOWED_URI, "--allow-uri", OTHER_URI
                )
            )
        else:
            upstream = stack.enter_context(run_upstream())
            up = f"http://127.0.0.1:{upstream.port}"
            serve = stack.enter_context(
                run_proxy(tp, up, "--allow-uri", ALLOWED_URI, "--allow-uri", OTHER_URI)
            )
            extra += ("--http", "--shutdown-grace", "0.5")
        c = stack.enter_context(run_client(tp, f"localhost:{serve.port}", *extra))
        held = socket.create_connection(("127.0.0.1", c.port), timeout=10)
        if mode == "l4":
            held.sendall(b"a")
            assert held.recv(10) == b"A"
        else:
            held.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert held.recv(65536).startswith(b"HTTP/1.1 200")
        shutil.copy(tp.key("other"), key)
        shutil.copy(tp.crt("other"), cert)
        _wait(lambda: c.metric('mtls_proxy_client_reloads_total{result="success"}') >= 1)
        held.close()  # closes the pre-reload connection (--http: the old pool retires)
        time.sleep(1.0)
        for _ in range(2):
            if mode == "l4":
                assert _talk(c.port, b"after", timeout=10) == b"AFTERbytes=5"
            else:
                r = subprocess.run(
                    ["curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}",
                     f"http://127.0.0.1:{c.port}/"],
                    capture_output=True, text=True, timeout=20,
                )  # fmt: skip
                assert r.stdout == "200", r.stderr
        assert not [r for r in c.records() if r.get("logger") == "asyncio"]


# -- E2: the app leaves while the dial is under way ----------------------------------------------
def test_e2_an_app_that_leaves_mid_dial_takes_the_remote_connection_with_it(tp: Pki) -> None:
    """E2 (medium, resources): an app reset while the target was being dialled cancelled the
    dial but left its TCP (or finished TLS) connection to the target open, with nobody behind
    it and outside --max-connections: a local loop of connect+reset piled up connections at the
    target (or a proxy) without bound."""
    lst, conns = silent_server()
    try:
        extra = ("--connect-timeout", "30", "--max-connections", "2")
        with run_client(tp, f"localhost:{lst.getsockname()[1]}", *extra) as c:
            for _ in range(6):
                n = len(conns)
                s = socket.create_connection(("127.0.0.1", c.port), timeout=5)
                _wait(lambda: len(conns) > n)  # noqa: B023 -- called at once, in this iteration
                reset(s)
            time.sleep(1.0)
            assert len(conns) == 6
            assert sum(still_open(s) for s in conns) == 0
            recs = [r for r in c.records() if r.get("msg") == "connection"]
            assert recs and all(r["ended"] == "reset by the local app" for r in recs), recs
    finally:
        lst.close()
        for s in conns:
            s.close()


# -- E3: the remote's close_notify without a FIN --------------------------------------------------
def test_e3_the_remotes_close_notify_reaches_the_app_as_a_fin(tp: Pki) -> None:
    """E3 (medium, hang): a remote that ends its direction with close_notify and keeps TCP open
    (TLS 1.3 half-close; ghostunnel's CloseWrite, Python's unwrap) never ended the app's read:
    SSLObject.read returns b"" for it, which the relay took for "nothing yet", and both sides
    waited for each other until --idle-timeout."""

    def hello_then_close_notify(t: ssl.SSLSocket, rec: bytearray) -> None:
        t.sendall(b"hello")
        t.settimeout(10)
        with contextlib.suppress(OSError, ValueError):
            t.unwrap()  # sends close_notify, then waits for ours
        rec += b"<unwrapped>"

    with (
        tls_remote(tp, hello_then_close_notify) as remote,
        run_client(tp, f"localhost:{remote.port}") as c,
        socket.create_connection(("127.0.0.1", c.port), timeout=5) as s,
    ):
        got, ended = b"", False
        with contextlib.suppress(TimeoutError):
            while data := s.recv(100):
                got += data
            ended = True
        assert (got, ended) == (b"hello", True)  # the end, not a timeout
        s.shutdown(socket.SHUT_WR)  # our close_notify: the remote's unwrap returns
        _wait(lambda: remote.got and remote.got[0] == b"<unwrapped>")


# -- E4: the target is gone when the app half-closes ---------------------------------------------
def test_e4_a_target_gone_before_the_apps_fin_is_not_a_local_reset(tp: Pki, loop: str) -> None:
    """E4 (low, log truthfulness): the target answered and closed its socket entirely; the app
    read the answer and its end, then closed: write_eof towards the gone target raised ENOTCONN
    inside the local transport's eof_received, so the local connection was torn down as a fatal
    error and logged "reset by the local app", and the app got a reset."""

    def answer_and_close(t: ssl.SSLSocket, rec: bytearray) -> None:
        t.sendall(b"bye")
        t.shutdown(socket.SHUT_WR)  # a FIN (no close_notify), then the socket is closed

    with (
        tls_remote(tp, answer_and_close) as remote,
        run_client(tp, f"localhost:{remote.port}", "--loop", loop) as c,
    ):
        with socket.create_connection(("127.0.0.1", c.port), timeout=5) as s:
            got = b""
            while data := s.recv(100):
                got += data
            assert got == b"bye"
        _wait(lambda: any(r.get("msg") == "connection" for r in c.records()))
        rec = next(r for r in c.records() if r.get("msg") == "connection")
        assert rec["ended"] != "reset by the local app", rec
        assert not [r for r in c.records() if r.get("logger") == "asyncio"]


# -- E5: `localhost` that resolves to a wildcard ----------------------------------------------
UNSHARE = shutil.which("unshare")


@pytest.mark.skipif(UNSHARE is None or os.geteuid() != 0, reason="needs unshare -m as root")
def test_e5_a_listen_name_resolving_off_loopback_is_refused(tp: Pki, tmp_path: Path) -> None:
    """E5 (medium, exposure): `--listen localhost:P` passed the loopback rule by its name, and
    bind() used what the resolver said; with `0.0.0.0 localhost` in /etc/hosts (a bad image,
    a hostile mount) the client listened on every interface and lent our certificate to the
    network. Run in a private mount namespace whose /etc/hosts says so."""
    hosts = tmp_path / "hosts"
    hosts.write_text("0.0.0.0 localhost\n")
    cmd = proxy_cmd(
        "client", "--listen", "localhost:0", "--admin", "off", "--target", "localhost:1",
        "--disable-authentication", "--cacert", tp.ca, "--log-format", "json",
    )  # fmt: skip
    script = f"mount --bind {hosts} /etc/hosts && exec timeout 5 {' '.join(cmd)}"
    r = subprocess.run(
        [str(UNSHARE), "-m", "sh", "-c", script], capture_output=True, text=True, timeout=30
    )
    assert '"msg": "ready"' not in r.stderr, r.stderr
    assert r.returncode == 2, r.stderr
    assert "resolved to 0.0.0.0, which is not loopback" in r.stderr


# -- E6: SIGTERM in --http mode ---------------------------------------------------------------
def test_e6_sigterm_in_http_mode_keeps_to_shutdown_grace(tp: Pki) -> None:
    """E6 (low, operations): in --http mode the local server's drain used aiohttp's own 60 s,
    not --shutdown-grace: a request slower than the grace held the process past it (and past
    a pod's terminationGracePeriodSeconds, into SIGKILL)."""
    with (
        run_upstream() as up,
        run_proxy(tp, f"http://127.0.0.1:{up.port}", "--upstream-timeout", "60") as serve,
        run_client(
            tp,
            f"localhost:{serve.port}",
            "--http",
            "--shutdown-grace",
            "1",
            "--upstream-timeout",
            "60",
        ) as c,  # fmt: skip
        socket.create_connection(("127.0.0.1", c.port), timeout=30) as s,
    ):
        s.sendall(b"GET /slow?s=15 HTTP/1.1\r\nHost: a\r\n\r\n")
        _wait(lambda: len(up.seen) == 1)
        start = time.monotonic()
        c.proc.send_signal(signal.SIGTERM)
        c.proc.wait(30)
        assert time.monotonic() - start < 6


# -- E7: headers the remote did not send --------------------------------------------------------
def fixed_answer(response: bytes) -> Callable[[ssl.SSLSocket, bytearray], None]:
    """A remote that records what comes and answers *response* to each request head."""

    def behave(t: ssl.SSLSocket, rec: bytearray) -> None:
        t.settimeout(10)
        with contextlib.suppress(OSError):
            while data := t.recv(65536):
                rec += data
                if rec.count(b"\r\n\r\n") > rec.count(b"<answered>"):
                    t.sendall(response)
                    rec += b"<answered>"

    return behave


def raw_http(port: int, request: bytes, timeout: float = 5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)  # no half-close: aiohttp drops a request whose client sent a FIN
        out = b""
        with contextlib.suppress(OSError):
            while data := s.recv(65536):
                out += data
        return out


def test_e7_http_mode_adds_no_content_type_or_server(tp: Pki) -> None:
    """E7 (low, fidelity): docs/egress.md says nothing is added, but aiohttp's defaults were:
    `Content-Type: application/octet-stream` on a response that had none (the app can no
    longer sniff it) and `Server: Python/3.x aiohttp/3.x` (ours, not the remote's)."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Remote: 1\r\n\r\nok"
    with (
        tls_remote(tp, fixed_answer(answer)) as remote,
        run_client(tp, f"localhost:{remote.port}", "--http") as c,
    ):
        out = raw_http(c.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    head = out.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 200") and b"x-remote: 1" in head, out
    assert b"content-type:" not in head and b"server:" not in head, out


# -- what held ------------------------------------------------------------------------------------
def test_held_http_mode_a_refused_remote_gets_no_byte_of_a_request_or_its_body(tp: Pki) -> None:
    """A pin mismatch in --http mode: 502 to the app; the remote completed a handshake and got
    nothing (not the head, not the body written before the dial finished)."""
    bad_pin = "sha256:" + "A" * 43 + "="
    with (
        tls_remote(tp, record_all) as remote,
        run_client(tp, f"localhost:{remote.port}", "--http", "--verify-spki-pin", bad_pin) as c,
    ):
        body = b"secret-body" * 100
        head = b"POST /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
        out = raw_http(c.port, head % len(body) + body)
        assert out.startswith(b"HTTP/1.1 502"), out
        assert c.metric('mtls_proxy_client_verify_failures_total{reason="pin"}') == 1
        time.sleep(0.3)
    assert remote.got and all(g == b"" for g in remote.got)


SMUGGLING = {
    "cl-te": b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two-cl": b"Content-Length: 4\r\nContent-Length: 40\r\n\r\nabcd",
    "same-cl-twice": b"Content-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
    "obs-fold": b"X-A: 1\r\n Transfer-Encoding: chunked\r\n\r\n",
    "te-chunked-not-last": b"Transfer-Encoding: chunked, gzip\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
    "te-space-before-colon": b"Transfer-Encoding : chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
    "te-identity-cl": b"Transfer-Encoding: identity\r\nContent-Length: 4\r\n\r\nabcd",
    "trailer-cl": b"Transfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 9\r\n\r\n",
}


def test_held_http_mode_ambiguous_framing_never_reaches_the_remote(tp: Pki) -> None:
    """aiohttp's llhttp answers 400 to every ambiguous framing; the remote sees none of it."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    with (
        tls_remote(tp, fixed_answer(answer)) as remote,
        run_client(tp, f"localhost:{remote.port}", "--http") as c,
    ):
        for name, rest in SMUGGLING.items():
            out = raw_http(c.port, b"POST / HTTP/1.1\r\nHost: a\r\n" + rest, timeout=3)
            assert out.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), (name, out)
        time.sleep(0.3)
    assert all(g == b"" for g in remote.got)


def test_held_http_mode_headers_and_targets_as_documented(tp: Pki) -> None:
    """Proxy-Authorization, Proxy-Connection, TE and the Connection-named fields stay here;
    an absolute-form target goes out in origin form with the target's Host; a CONNECT to
    the client itself is not forwarded; the Expect dance leaves no body on a reused
    connection (aiohttp closes a connection whose body was not sent)."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    with (
        tls_remote(tp, fixed_answer(answer)) as remote,
        run_client(tp, f"localhost:{remote.port}", "--http") as c,
    ):
        out = raw_http(
            c.port,
            b"GET http://evil.example:81/abs?q=1 HTTP/1.1\r\nHost: evil.example\r\n"
            b"Proxy-Authorization: Basic c2VjcmV0\r\nProxy-Connection: keep-alive\r\nTE: trailers"
            b"\r\nConnection: close, X-Secret\r\nX-Secret: s\r\nX-Kept: k\r\n\r\n",
        )
        assert out.startswith(b"HTTP/1.1 200"), out
        out = raw_http(c.port, b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example\r\n\r\n")
        assert not out.startswith(b"HTTP/1.1 200"), out
        time.sleep(0.3)
    sent = b"".join(remote.got)
    assert sent.startswith(b"GET /abs?q=1 HTTP/1.1\r\n"), sent
    assert f"Host: localhost:{remote.port}\r\n".encode() in sent
    for leaked in (b"secret", b"c2VjcmV0", b"evil", b"Proxy-", b"TE:", b"CONNECT"):
        assert leaked not in sent, (leaked, sent)
    assert b"X-Kept: k" in sent


def _never(sock: socket.socket, _n: int) -> None:
    time.sleep(20)


def _huge(sock: socket.socket, _n: int) -> None:
    sock.recv(1000)
    with contextlib.suppress(OSError):
        sock.sendall(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 100_000)
        time.sleep(5)


def _trickle(sock: socket.socket, _n: int) -> None:
    sock.recv(1000)
    with contextlib.suppress(OSError):
        for b in b"HTTP/1.1 200 OK\r\nX-Slow: 1":
            sock.send(bytes([b]))
            time.sleep(0.3)
        time.sleep(20)


def _garbage(sock: socket.socket, _n: int) -> None:
    sock.recv(1000)
    with contextlib.suppress(OSError):
        sock.sendall(b"HTTP/1.1 200 OK\r\n\r\nNOT TLS AT ALL\r\n")
        time.sleep(3)


@pytest.mark.parametrize(
    ("behave", "kind", "stage"),
    [
        (_never, "http", "timeout"),
        (_never, "socks5", "timeout"),
        (_trickle, "http", "timeout"),
        (_huge, "http", "proxy"),
        (_garbage, "http", "tls"),
    ],
)
def test_held_a_hostile_proxy_is_bounded(
    tp: Pki, behave: Callable[[socket.socket, int], None], kind: str, stage: str
) -> None:
    srv = serve_raw(behave)
    try:
        proxy = f"{kind}://127.0.0.1:{srv.getsockname()[1]}"
        extra = ("--proxy", proxy, "--connect-timeout", "2")
        with run_client(tp, "payments.example:443", *extra) as c:
            start = time.monotonic()
            assert _talk(c.port, b"x", timeout=15) == b""
            assert time.monotonic() - start < 5
            _wait(lambda: any(r.get("msg") == "target not reached" for r in c.records()))
            rec = next(r for r in c.records() if r.get("msg") == "target not reached")
            assert rec["stage"] == stage, rec
    finally:
        srv.close()


def test_held_a_socks5_reply_with_a_domain_address_split_at_every_byte(
    tp: Pki, echo_serve: Proxy
) -> None:
    def socks(sock: socket.socket, _n: int) -> None:
        sock.recv(3)
        sock.sendall(b"\x05\x00")
        req = sock.recv(300)
        port = int.from_bytes(req[5 + req[4] : 7 + req[4]], "big")
        up = socket.create_connection(("127.0.0.1", port))
        for b in b"\x05\x00\x00\x03\x0eproxy.internal\x00\x50":
            sock.send(bytes([b]))
            time.sleep(0.005)

        def pipe(a: socket.socket, b: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := a.recv(65536):
                    b.sendall(data)
                b.shutdown(socket.SHUT_WR)

        threading.Thread(target=pipe, args=(up, sock), daemon=True).start()
        pipe(sock, up)

    srv = serve_raw(socks)
    try:
        proxy = f"socks5://127.0.0.1:{srv.getsockname()[1]}"
        with run_client(tp, f"localhost:{echo_serve.port}", "--proxy", proxy) as c:
            assert _talk(c.port, b"hi") == b"HIbytes=2"
    finally:
        srv.close()


@pytest.mark.parametrize(
    "listen", ["[::]:0", "0:0", "[::ffff:127.0.0.1]:0", "127.1:0", "LOCALHOST:0"]
)
def test_held_wildcard_and_odd_loopback_spellings_are_refused(listen: str) -> None:
    """Fail closed: a spelling the rule does not know is refused, loopback or not."""
    with pytest.raises(Exception, match="reachable from other hosts"):
        load_client_config(
            flags={"listen": listen, "target": "a:1", "disable-authentication": True}
        )


def test_held_a_non_socket_file_at_the_unix_path_is_kept(tp: Pki, tmp_path: Path) -> None:
    path = tmp_path / "egress.sock"
    path.write_text("precious")
    r = subprocess.run(
        proxy_cmd("client", "--listen", f"unix:{path}", "--admin", "off", "--target",
                  "localhost:1", *tp.material("good")),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode != 0 and '"msg": "ready"' not in r.stderr
    assert path.read_text() == "precious"


def test_held_no_key_material_in_logs_or_status(tp: Pki, tmp_path: Path) -> None:
    """A key given as the certificate, at a reload: the error names the file, never its body."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(tp.crt("good"), cert)
    shutil.copy(tp.key("good"), key)
    body = Path(tp.key("good")).read_text().splitlines()[1]
    with (
        tls_remote(tp, record_all) as remote,
        run_client(tp, f"localhost:{remote.port}", "--cert", str(cert), "--key", str(key)) as c,
    ):
        shutil.copy(tp.key("good"), cert)
        _wait(lambda: c.metric('mtls_proxy_client_reloads_total{result="failure"}') >= 1)
        status = c.admin_get("/status")[1]
        assert json.loads(status)["last_reload"]["ok"] is False
        assert body[:40] not in status and body[:40] not in "".join(c.logs)
        assert "PRIVATE KEY" not in "".join(c.logs) + status
