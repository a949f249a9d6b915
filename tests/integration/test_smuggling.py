"""Ambiguous or malformed requests are refused at the edge; nothing reaches the upstream."""

from __future__ import annotations

import ssl

import pytest

from tests.helpers import Pki, Upstream, client_ctx, run_proxy, send_and_read

P = b"POST / HTTP/1.1\r\nHost: a\r\n"
CASES = [
    ("SMG-001 CL+TE", P + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("SMG-003 two CL", P + b"Content-Length: 1\r\nContent-Length: 0\r\n\r\nZ", 400),
    ("SMG-006 CL hex", P + b"Content-Length: 0x10\r\n\r\n", 400),
    ("SMG-008 chunked twice", P + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400),
    ("SMG-010 ,chunked", P + b"Transfer-Encoding: ,chunked\r\n\r\n0\r\n\r\n", 501),
    ("SMG-014 gzip, chunked", P + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    (
        "SMG-018 HTTP/1.0 + TE",
        b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("SMG-021 bad chunk size", P + b"Transfer-Encoding: chunked\r\n\r\n+1\r\nZ\r\n0\r\n\r\n", 400),
    ("SMG-027 bare LF head", b"GET / HTTP/1.1\nHost: a\n\n", 400),
    ("SMG-028 CR in value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
    ("SMG-029 NUL in value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    (
        "HDR-005 space before colon",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Client-Subject : v\r\n\r\n",
        400,
    ),
    ("HDR-006 obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-Client-Subject: a\r\n b\r\n\r\n", 400),
    ("SMG-035 two Host", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("SMG-036 no Host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("SMG-037 Host list", b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n", 400),
    ("SMG-039 authority-form", b"GET evil.test:80 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("SMG-040 CONNECT", b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n", 405),
    ("SMG-042 GET *", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("SMG-044 HTTP/2.0", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ("SMG-045 http/1.1", b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
    ("SMG-048 lower method", b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
]


def exchange(port: int, ctx: ssl.SSLContext, payload: bytes) -> bytes:
    return send_and_read(port, ctx, payload)


@pytest.mark.parametrize(("name", "payload", "status"), CASES, ids=[c[0] for c in CASES])
def test_refused_with_status_and_closed(
    tp: Pki, upstream: Upstream, name: str, payload: bytes, status: int
) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}") as p:
        out = exchange(p.port, client_ctx(tp, "good"), payload)
    assert out.startswith(b"HTTP/1.1 %d " % status), (name, out[:200])
    assert b"Connection: close" in out.partition(b"\r\n\r\n")[0]
    assert upstream.seen == [] and upstream.errors == []


def test_absolute_form_and_fragment_become_origin_form(tp: Pki, upstream: Upstream) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}") as p:
        ctx = client_ctx(tp, "good")
        exchange(
            p.port,
            ctx,
            b"GET http://evil.test/x?y=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        exchange(p.port, ctx, b"GET /a#frag HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert [s.target for s in upstream.seen] == ["/x?y=1", "/a"]
    assert upstream.seen[0].one("host") == "a"


def test_valid_request_then_garbage_is_one_response_then_400(tp: Pki, upstream: Upstream) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}") as p:
        out = exchange(
            p.port, client_ctx(tp, "good"), b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nInvalid\r\n\r\n"
        )
    assert out.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 400" in out
    assert [s.target for s in upstream.seen] == ["/ok"]


def test_declined_upgrade_does_not_tunnel(tp: Pki, upstream: Upstream) -> None:
    """SMG-058: a declined upgrade never puts the proxy in tunnel mode."""
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}") as p:
        ctx = client_ctx(tp, "good")
        out = exchange(
            p.port,
            ctx,
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"\r\nGET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        with_body = exchange(
            p.port,
            ctx,
            b"POST /ws HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\n"
            b"Connection: Upgrade\r\nContent-Length: 2\r\n\r\nab",
        )
    assert out.count(b"HTTP/1.1 200") == 2
    assert [s.target for s in upstream.seen] == ["/ws", "/next"]
    assert upstream.seen[0].get("upgrade") == [] and upstream.seen[0].get("connection") == []
    assert upstream.seen[1].one("x-client-subject") == "CN=client-good,O=Example Corp"
    assert with_body.startswith(b"HTTP/1.1 501")
