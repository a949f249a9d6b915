"""Red team of `mtls-proxy client` (docs/egress.md; core/egress.py, core/tunnelproto.py,
dataplane/dialer.py, dataplane/egress.py, dataplane/egress_http.py, server/egress.py), from
outside: real `client` processes, hostile TLS remotes, proxies and local apps on 127.0.0.1.

Findings are numbered E1, E2, ...: each test failed before its fix (a strict xfail, with the
reason, where no fix was made); the tests without a number document what held."""

from __future__ import annotations

import asyncio
import contextlib
import json
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
from mtls_proxy.dataplane.dialer import Dialer
from mtls_proxy.material.egress import client_context, load_client_material
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
                s = socket.create_connection(("127.0.0.1", c.port), timeout=5)
                _wait(lambda n=len(conns): len(conns) > n)
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
