"""Anti-spoofing: client copies of identity headers never reach the upstream (docs/headers.md)."""

from __future__ import annotations

import pytest

from tests.helpers import Pki, Upstream, client_ctx, connect, read_response, request, run_proxy

IDENTITY = [
    "X-Forwarded-Client-Cert",
    "X-Client-Subject",
    "X-Client-Cert-Sha256",
    "X-Client-SPIFFE-ID",
    "X-Client-DNS",
    "X-Client-Verified",
    "Client-Cert",
    "Client-Cert-Chain",
    "ssl_client_cert",
    "X-Forwarded-Tls-Client-Cert",
    "X-Forwarded-Tls-Client-Cert-Info",
]


def variants(name: str) -> list[str]:
    return [name, name.lower(), name.upper(), name.replace("-", "_"), name.replace("_", "-")]


@pytest.mark.parametrize("name", IDENTITY)
def test_every_spelling_of_an_identity_header_is_removed(
    tp: Pki, upstream: Upstream, name: str
) -> None:
    lines = "".join(f"{v}: spoofed-{i}\r\n" for i, v in enumerate(variants(name)))
    lines += f"{name}: \r\n{name}: spoofed-again\r\n"  # empty and repeated
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}") as p:
        raw = f"GET / HTTP/1.1\r\nHost: a\r\n{lines}\r\n".encode()
        assert request(p.port, client_ctx(tp, "good"), raw)[0] == 200
    seen = upstream.seen[0]
    assert not any("spoofed" in v for _, v in seen.headers), seen.headers
    norm = name.lower().replace("_", "-")
    assert all(k.replace("_", "-") != norm or v for k, v in seen.headers)
    assert len(seen.get("x-forwarded-client-cert")) == 1
    assert len(seen.get("x-client-subject")) == 1


@pytest.mark.parametrize(
    "connection",
    [
        "x-forwarded-client-cert",
        "keep-alive, X-Client-Subject",
        "close, x-forwarded-client-cert",
        ",  X-Client-Subject ,",
        "X-Forwarded-For, X-Forwarded-Proto, Host, Content-Length",
    ],
)
def test_connection_cannot_remove_injected_headers(
    tp: Pki, upstream: Upstream, loop: str, connection: str
) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}", loop=loop) as p:
        raw = (
            f"POST / HTTP/1.1\r\nHost: a\r\nConnection: {connection}\r\nConnection: X-Gone\r\n"
            "X-Gone: 1\r\nX-Stays: 1\r\nContent-Length: 3\r\n\r\nabc"
        ).encode()
        assert request(p.port, client_ctx(tp, "good"), raw)[0] == 200
    seen = upstream.seen[0]
    assert len(seen.get("x-forwarded-client-cert")) == 1
    assert seen.one("x-client-subject") == "CN=client-good,O=Example Corp"
    assert seen.one("x-forwarded-for") == "127.0.0.1"
    assert seen.one("x-forwarded-proto") == "https"
    assert seen.one("host") == "a"
    assert seen.body_len == 3
    assert seen.get("connection") == [] and seen.get("x-gone") == []
    assert seen.one("x-stays") == "1"


def test_hop_by_hop_and_forwarding_headers(tp: Pki, upstream: Upstream) -> None:
    hop = (
        "Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
        "Trailer: X-T\r\nUpgrade: h2c\r\nHTTP2-Settings: AAAA\r\nProxy-Authorization: x\r\n"
        "X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: evil\r\n"
        "Forwarded: for=1.2.3.4;proto=http\r\nX-Real-IP: 1.2.3.4\r\n"
    )
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}") as p:
        raw = f"GET / HTTP/1.1\r\nHost: svc\r\n{hop}\r\n".encode()
        assert request(p.port, client_ctx(tp, "good"), raw)[0] == 200
    seen = upstream.seen[0]
    for name in (
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "http2-settings",
        "proxy-authorization",
        "forwarded",
        "x-real-ip",
        "connection",
    ):
        assert seen.get(name) == [], name
    assert seen.one("x-forwarded-for") == "127.0.0.1"
    assert seen.one("x-forwarded-proto") == "https"
    assert seen.one("x-forwarded-host") == "svc"


def test_identity_in_request_trailers_is_dropped(tp: Pki, upstream: Upstream) -> None:
    with run_proxy(tp, f"http://127.0.0.1:{upstream.port}") as p:
        raw = (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Client-Subject: CN=admin\r\n"
            b"X-Forwarded-Client-Cert: Hash=00\r\n\r\n"
        )
        assert request(p.port, client_ctx(tp, "good"), raw)[0] == 200
    seen = upstream.seen[0]
    assert seen.body_len == 3
    assert seen.one("x-client-subject") == "CN=client-good,O=Example Corp"
    assert "Hash=00" not in seen.one("x-forwarded-client-cert")


def test_every_keepalive_and_pipelined_request_gets_fresh_identity(
    tp: Pki, upstream: Upstream
) -> None:
    with (
        run_proxy(tp, f"http://127.0.0.1:{upstream.port}") as p,
        connect(p.port, client_ctx(tp, "good")) as s,
    ):
        buf = bytearray()
        one = b"GET /%d HTTP/1.1\r\nHost: a\r\nX-Client-Subject: CN=admin\r\n\r\n"
        s.sendall(one % 1)
        assert read_response(s, buf)[0] == 200
        s.sendall(b"".join(one % i for i in (2, 3, 4)))  # pipelined in one write
        statuses = [read_response(s, buf)[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert [x.target for x in upstream.seen] == ["/1", "/2", "/3", "/4"]
    for x in upstream.seen:
        assert x.one("x-client-subject") == "CN=client-good,O=Example Corp"
