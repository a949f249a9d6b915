"""TLS session resumption: the server-side session cache (default) and stateless tickets,
sessions kept when a client closes without close_notify, the cache's bound, and revocation
enforced on resumed connections (whose chain OpenSSL does not re-verify)."""

from __future__ import annotations

import concurrent.futures
import socket
import ssl
import time
from pathlib import Path

import pytest

from mtls_proxy.cli import pki
from tests.helpers import (
    Pki,
    Proxy,
    Upstream,
    ask,
    client_ctx,
    connect,
    make_test_pki,
    read_response,
    resume_and_request,
    run_proxy,
)
from tests.integration.test_reload import wait_reload


def first_session(port: int, ctx: ssl.SSLContext, close_notify: bool = True) -> ssl.SSLSession:
    """One request on a full handshake; the session the proxy issued. Closed with a TLS
    close_notify, or (as most HTTP clients do) by just closing the socket."""
    s = connect(port, ctx)
    s.sendall(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
    assert read_response(s, bytearray())[0] == 200
    assert not s.session_reused
    session = s.session
    assert session is not None
    if close_notify:
        s.unwrap().close()
    else:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\0" * 8)  # plain FIN, no alert
        s.close()
    return session


def resumed(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession) -> ssl.SSLSocket:
    """A connection offering *session*, with one answered request (caller closes it)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    s = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
    s.sendall(b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")
    assert read_response(s, bytearray())[0] == 200
    return s


def busy(port: int, ctx: ssl.SSLContext) -> None:
    """Enough work in the proxy for its garbage collector to free closed connections (and
    with them, in OpenSSL, the sessions of connections closed without close_notify)."""
    s = connect(port, ctx)
    buf = bytearray()
    for _ in range(200):
        s.sendall(b"GET /busy HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(s, buf)[0] == 200
    s.unwrap().close()


def cached(p: Proxy, at_least: int) -> float:
    """The session-cache gauge once the sweeper (4 Hz) has seen *at_least* sessions."""
    deadline = time.monotonic() + 5
    while (n := p.metric("mtls_proxy_tls_session_cache_sessions")) < at_least:
        assert time.monotonic() < deadline, f"cache gauge stuck at {n}"
        time.sleep(0.1)
    return n


@pytest.mark.parametrize("tls13", [True, False], ids=["tls13", "tls12"])
@pytest.mark.parametrize("close_notify", [True, False], ids=["close_notify", "plain_close"])
def test_sessions_resume_from_the_cache(
    tp: Pki, upstream: Upstream, tls13: bool, close_notify: bool, loop: str
) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p:
        ctx = client_ctx(tp, "good", tls13=tls13)
        session = first_session(p.port, ctx, close_notify)
        for _ in range(30):  # more closed connections, and requests: garbage for the collector
            first_session(p.port, ctx, close_notify)
        busy(p.port, ctx)
        s = resumed(p.port, ctx, session)
        assert s.session_reused
        s.close()
        assert p.metric("mtls_proxy_tls_sessions_resumed_total") == 1
        assert cached(p, 32) >= 32  # every session kept (and the resumed one's new ticket)
        # Identity headers on the resumed connection are the client's, as on the first.
        first, again = upstream.seen[0], upstream.seen[-1]
        assert (first.target, again.target) == ("/first", "/again")
        assert again.get("x-forwarded-client-cert") == first.get("x-forwarded-client-cert")
        assert "client-good" in again.get("x-forwarded-client-cert")[0]


def test_tickets_mode_resumes_without_a_cache(tp: Pki, upstream: Upstream, loop: str) -> None:
    with run_proxy(
        tp, f"http://127.0.0.1:{upstream.port}", "--tls-sessions", "tickets", loop=loop
    ) as p:
        ctx = client_ctx(tp, "good", tls13=True)
        s = resumed(p.port, ctx, first_session(p.port, ctx, close_notify=False))
        assert s.session_reused
        s.close()
        time.sleep(0.5)  # a sweep
        assert p.metric("mtls_proxy_tls_session_cache_sessions") == 0


def test_the_cache_is_bounded_and_starts_again_when_full(
    tp: Pki, upstream: Upstream, loop: str
) -> None:
    with run_proxy(
        tp, f"http://127.0.0.1:{upstream.port}", "--tls-session-cache-size", "3", loop=loop
    ) as p:
        ctx = client_ctx(tp, "good", tls13=True)
        sessions = [first_session(p.port, ctx) for _ in range(5)]
        deadline = time.monotonic() + 5
        while not any("TLS session cache full" in line for line in p.logs):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert p.metric("mtls_proxy_tls_session_cache_sessions") <= 3
        # The sessions of the full cache are gone; one issued since resumes.
        assert not resumed(p.port, ctx, sessions[0]).session_reused
        fresh = first_session(p.port, ctx)
        assert resumed(p.port, ctx, fresh).session_reused


@pytest.fixture
def own(tmp_path: Path) -> Pki:
    return make_test_pki(tmp_path / "pki")


@pytest.mark.parametrize("mode", ["cache", "tickets"])
def test_a_crl_reload_cuts_resumed_connections_of_the_revoked_client(
    own: Pki, upstream: Upstream, mode: str
) -> None:
    """A resumed session has no verified chain in OpenSSL: the chain its leaf was verified
    with at the full handshake is what the reloaded CRL is checked against."""
    crl = pki.revoke(own.dir, "other")
    up = f"http://127.0.0.1:{upstream.port}"
    with run_proxy(own, up, "--crl", str(crl), "--tls-sessions", mode) as p:
        good = client_ctx(own, "good", tls13=True)
        session = first_session(p.port, good, close_notify=False)
        keep = resumed(p.port, good, session)
        assert keep.session_reused
        pki.revoke(own.dir, "good")
        wait_reload(p, 1, "success")
        assert p.metric('mtls_proxy_connections_cut_total{reason="revoked"}') == 1
        assert ask(keep, "/after") is None
        keep.close()
        # TLS-037 in this mode: the session does not resume under the new trust either.
        assert resume_and_request(p.port, good, session) == b""
        assert not any("/after" in seen.target for seen in upstream.seen)


def test_closed_connections_give_their_memory_back(tp: Pki, upstream: Upstream) -> None:
    """Thousands of short connections: the proxy's memory stays flat (a closed connection's
    TLS state and read buffer are freed at once, not left for the garbage collector)."""
    with run_proxy(
        tp, f"http://127.0.0.1:{upstream.port}", "--tls-sessions", "tickets", "--no-access-log"
    ) as p:
        ctx = client_ctx(tp, "good", tls13=True)
        session = first_session(p.port, ctx)

        def churn(n: int) -> None:
            # 16 clients at once, as a busy sidecar sees them: many connections close
            # between two passes of the garbage collector.
            def client(_: int) -> None:
                for _ in range(n // 16):
                    resumed(p.port, ctx, session).close()

            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                list(pool.map(client, range(16)))

        churn(300)  # warm-up: caches, pools, allocator arenas
        before = p.rss_kb()
        churn(2000)
        grown = p.rss_kb() - before
        assert grown < 5000, f"RSS grew {grown} KB over 2000 connections"
