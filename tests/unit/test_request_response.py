"""Request validation/serialization and upstream response parsing/re-framing tables."""

from __future__ import annotations

import json

import pytest

from mtls_proxy.core.errors import (
    BadRequest,
    ExpectationFailed,
    MethodNotAllowed,
    NotImplementedCoding,
    ProxyError,
    VersionNotSupported,
)
from mtls_proxy.core.headers import IdentityBlock
from mtls_proxy.http1.request import (
    AmbiguousTarget,
    UnderscoreHeader,
    UpgradeWithBody,
    origin_form,
    prepare,
)
from mtls_proxy.http1.response import (
    CHUNKED,
    LENGTH,
    NONE,
    UNTIL_CLOSE,
    MalformedResponse,
    body_mode,
    client_head,
    error_response,
    parse_head,
)

BLOCK = IdentityBlock(b"X-Client-Subject: CN=c\r\n", b"Hash=1", "sanitize_set")


def prep(
    headers: list[tuple[bytes, bytes]],
    method: bytes = b"GET",
    url: bytes = b"/",
    version: str = "1.1",
    upgrade: bool = False,
    normalize: bool = False,
):  # type: ignore[no-untyped-def]
    return prepare(
        method,
        url,
        version,
        headers,
        upgrade=upgrade,
        client_ip=b"10.0.0.9",
        block=BLOCK,
        default_host=b"up:80",
        normalize=normalize,
    )


def test_prepare_builds_the_upstream_head() -> None:
    p = prep(
        [
            (b"Host", b"svc"),
            (b"X-A", b"1"),
            (b"Content-Length", b"3"),
            (b"X-Client-Subject", b"spoof"),
            (b"X-Forwarded-Client-Cert", b"By=evil"),
        ],
        method=b"POST",
        url=b"/p?q=1#frag",
    )
    assert p.path == b"/p?q=1" and p.has_body and not p.chunked and not p.expect
    assert p.head == (
        b"POST /p?q=1 HTTP/1.1\r\nHost: svc\r\nX-A: 1\r\nX-Forwarded-For: 10.0.0.9\r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: svc\r\nX-Request-Id: -\r\n"
        b"X-Client-Subject: CN=c\r\nx-forwarded-client-cert: Hash=1\r\n"
        b"Content-Length: 3\r\n\r\n"
    )


def test_prepare_chunked_expect_and_http10_default_host() -> None:
    p = prep([(b"Host", b"a"), (b"Transfer-Encoding", b"Chunked"), (b"Expect", b"100-Continue")])
    assert p.chunked and p.has_body and p.expect
    assert p.head.endswith(b"Transfer-Encoding: chunked\r\n\r\n")
    p = prep([], version="1.0")
    assert b"Host: up:80\r\n" in p.head and not p.has_body
    assert prep([(b"Host", b"a"), (b"Expect", b"100-continue")], version="1.0").expect is False
    assert prep([(b"Host", b"a"), (b"Content-Length", b"0")], method=b"POST").has_body is False
    assert prep([(b"Host", b"a")], upgrade=True).path == b"/"


@pytest.mark.parametrize(
    ("kw", "err"),
    [
        ({"headers": [(b"Host", b"a")], "version": "2.0"}, VersionNotSupported),
        ({"headers": [(b"Host", b"a")], "method": b"CONNECT"}, MethodNotAllowed),
        ({"headers": []}, BadRequest),
        ({"headers": [(b"Host", b"a"), (b"Host", b"b")]}, BadRequest),
        ({"headers": [(b"Host", b"a, b")]}, BadRequest),
        ({"headers": [(b"Host", b"")]}, BadRequest),
        ({"headers": [(b"Host", b"a")], "url": b"a:80"}, BadRequest),
        ({"headers": [(b"Host", b"a")], "url": b"*"}, BadRequest),
        ({"headers": [(b"Host", b"a")], "url": b"http:///x"}, BadRequest),
        ({"headers": [(b"Host", b"a")], "url": b"http://"}, BadRequest),
        ({"headers": [(b"Host", b"a")], "url": b"/a/../../x", "normalize": True}, BadRequest),
        ({"headers": [(b"Transfer-Encoding", b"chunked")], "version": "1.0"}, BadRequest),
        (
            {"headers": [(b"Host", b"a"), (b"Transfer-Encoding", b"gzip, chunked")]},
            NotImplementedCoding,
        ),
        ({"headers": [(b"Host", b"a"), (b"Expect", b"y")]}, ExpectationFailed),
        (
            {"headers": [(b"Host", b"a"), (b"Content-Length", b"2")], "upgrade": True},
            UpgradeWithBody,
        ),
    ],
)
def test_prepare_refuses(kw: dict[str, object], err: type[ProxyError]) -> None:
    with pytest.raises(err):
        prep(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("method", "url", "target"),
    [
        (b"GET", b"/a?b", b"/a?b"),
        (b"OPTIONS", b"*", b"*"),
        (b"GET", b"http://evil/x?y", b"/x?y"),
        (b"GET", b"http://evil", b"/"),
        (b"GET", b"HTTPS://evil", b"/"),
        (b"GET", b"/a#b", b"/a"),
    ],
)
def test_origin_form(method: bytes, url: bytes, target: bytes) -> None:
    assert origin_form(method, url) == target


def test_prepare_forwards_a_websocket_upgrade_as_one() -> None:
    headers = [
        (b"Host", b"a"),
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"Sec-WebSocket-Version", b"13"),
    ]
    p = prep(headers, upgrade=True)
    assert p.ws_key == b"dGhlIHNhbXBsZSBub25jZQ=="
    assert b"Upgrade: websocket\r\nConnection: Upgrade\r\n" in p.head
    h2c = prep([(b"Host", b"a"), (b"Upgrade", b"h2c"), (b"Connection", b"Upgrade")], upgrade=True)
    assert h2c.ws_key is None and b"pgrade" not in h2c.head


def test_prepare_normalizes_the_path_when_routes_need_it() -> None:
    p = prep([(b"Host", b"a")], url=b"/x/..//admin?q", normalize=True)
    assert p.path == b"/admin?q" and p.head.startswith(b"GET /admin?q HTTP/1.1\r\n")


def test_parse_head_filters_hop_by_hop_and_nominated() -> None:
    h = parse_head(
        b"HTTP/1.1 200 OK\r\nConnection: X-Foo, , close\r\nX-Foo: 1\r\n"
        b"Keep-Alive: timeout=1\r\nTransfer-Encoding: chunked\r\nX-Ok: y \r\n"
        b"Proxy-Connection: x"
    )
    assert (h.status, h.reason, h.http10, h.close) == (200, b"OK", False, True)
    assert h.lines == [b"X-Ok: y \r\n"] and h.transfer_encoding == [b" chunked"]
    h = parse_head(b"HTTP/1.0 204\r\nContent-Length: 0\r\nX-A: b")
    assert (h.status, h.reason, h.http10, h.lines) == (204, b"", True, [b"X-A: b\r\n"])


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 2000 OK",
        b"ICE/1.0 200 OK",
        b"HTTP/1.1 200 OK\r\nX: a\x00b",
        b"HTTP/1.1 200 OK\nX: bare-lf",
        b"HTTP/1.1 200 OK\r\nX: a\rb",
        b"HTTP/1.1 200 OK\r\nNo-Colon",
        b"HTTP/1.1 200 OK\r\nBad Name: v",
        b"HTTP/1.1 200 OK\r\n: v",
        b"HTTP/1.1 200 OK\r\n obs-fold",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 9000,
    ],
)
def test_parse_head_refuses(head: bytes) -> None:
    with pytest.raises(MalformedResponse):
        parse_head(head)


@pytest.mark.parametrize(
    ("head", "is_head", "mode"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5", False, (LENGTH, 5)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5", False, (LENGTH, 5)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5", True, (NONE, 0)),
        (b"HTTP/1.1 204 No Content", False, (NONE, 0)),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9", False, (NONE, 0)),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", False, (CHUNKED, 0)),
        (b"HTTP/1.1 200 OK", False, (UNTIL_CLOSE, 0)),
    ],
)
def test_body_mode(head: bytes, is_head: bool, mode: tuple[int, int]) -> None:
    parsed = parse_head(head)
    assert body_mode(parsed, is_head) == mode
    assert body_mode(parsed, is_head) == mode  # again: from the head's cached framing


def test_body_mode_is_found_once_per_head_and_never_for_head_requests() -> None:
    head = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5")
    assert body_mode(head, True) == (NONE, 0) and head.framing is None
    assert body_mode(head, False) == (LENGTH, 5) and head.framing == (LENGTH, 5)
    head.content_length = [b"7"]  # a cached head is never mutated; the answer stays found
    assert body_mode(head, False) == (LENGTH, 5)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip",
    ],
)
def test_body_mode_refuses(head: bytes) -> None:
    with pytest.raises(MalformedResponse):
        body_mode(parse_head(head), False)


def test_client_head_reframes() -> None:
    h = parse_head(b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 5")
    assert client_head(h, LENGTH, 5, False, False) == (
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 5\r\n\r\n",
        False,
        False,
    )
    data, chunked, close = client_head(h, CHUNKED, 0, False, False)
    assert chunked and not close and b"Transfer-Encoding: chunked\r\n" in data
    data, chunked, close = client_head(h, UNTIL_CLOSE, 0, True, False)
    assert not chunked and close and data.endswith(b"X-A: 1\r\nConnection: close\r\n\r\n")
    data, _, _ = client_head(h, NONE, 0, True, False)  # HEAD keeps the CL, 1.0 keep-alive
    assert data.endswith(b"Content-Length: 5\r\nConnection: keep-alive\r\n\r\n")


def test_error_response() -> None:
    r = error_response(403, "forbidden", 'no "rule"', False, True)
    head, _, body = r.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n") and b"Connection: close" in head
    assert json.loads(body) == {"error": "forbidden", "reason": 'no "rule"'}
    assert error_response(418, "x", "y", True, False).endswith(b"\r\n\r\n")


def test_head_cache_memoises_and_stays_bounded() -> None:
    from mtls_proxy.http1.response import HeadCache

    cache = HeadCache(size=2)
    a = cache.parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1")
    assert cache.parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1") is a
    cache.parse(b"HTTP/1.1 204 No Content")
    cache.parse(b"HTTP/1.1 304 Not Modified")  # evicts the oldest
    assert cache.parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1") is not a


def test_prepare_sets_forwarded_port_and_applies_the_underscore_action() -> None:
    """INT-005, INT-030: X-Forwarded-Port is the listener's; '_' names follow the action."""
    raw = [(b"Host", b"svc"), (b"X_A", b"1"), (b"Content_Length", b"9")]
    p = prepare(
        b"GET",
        b"/",
        "1.1",
        raw,
        upgrade=False,
        client_ip=b"1.2.3.4",
        block=BLOCK,
        default_host=b"up",
        port=b"8443",
    )
    assert b"\r\nX-Forwarded-Port: 8443\r\n" in p.head and b"X_A" not in p.head
    assert p.underscored == [b"X_A", b"Content_Length"] and not p.has_body
    with pytest.raises(UnderscoreHeader):
        prepare(
            b"GET",
            b"/",
            "1.1",
            raw,
            upgrade=False,
            client_ip=b"1.2.3.4",
            block=BLOCK,
            default_host=b"up",
            underscores="reject",
        )
    with pytest.raises(AmbiguousTarget):
        prep([(b"Host", b"a")], url=b"/a/..;/b", normalize=True)


def test_port_lines_are_memoised_within_a_bound() -> None:
    from mtls_proxy.http1 import request

    for n in range(100):
        assert request._port_line(b"%d" % n) == b"\r\nX-Forwarded-Port: %d\r\n" % n
    assert len(request._PORT_LINES) <= 64
    assert request._port_line(b"") == b"\r\n"
