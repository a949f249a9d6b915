"""http2/request.py: RFC 9113 8.2-8.3 on a decoded header block, and the hand-over to prepare.

The translated request goes through http1.request.prepare, the same rules as an HTTP/1.1
request: the last tests check that a header a client sends under an identity header's name
over HTTP/2 never reaches the upstream either."""

from __future__ import annotations

import pytest

from mtls_proxy.core.errors import BadRequest, MethodNotAllowed
from mtls_proxy.core.headers import IdentityBlock
from mtls_proxy.http1.request import prepare
from mtls_proxy.http2.request import MalformedH2Request, translate

BASE = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"svc.example:8443"),
    (b":path", b"/a?b=1"),
]


def test_plain_get() -> None:
    r = translate([*BASE, (b"accept", b"*/*")], end_stream=True)
    assert (r.method, r.path, r.scheme) == (b"GET", b"/a?b=1", b"https")
    assert r.raw == [(b"host", b"svc.example:8443"), (b"accept", b"*/*")]
    assert r.content_type is None and r.te_trailers is False


def test_grpc_call_keeps_its_content_type_and_te() -> None:
    r = translate(
        [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":path", b"/pkg.Svc/Method"),
            (b":authority", b"svc"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ],
        end_stream=False,
    )
    assert r.content_type == b"application/grpc" and r.te_trailers is True
    assert (b"te", b"trailers") not in r.raw  # hop-by-hop for an HTTP/1.1 upstream
    assert r.raw[-1] == (b"transfer-encoding", b"chunked")  # rule 6: length not declared


def test_declared_length_is_not_chunked() -> None:
    r = translate([*BASE, (b"content-length", b"3")], end_stream=False)
    assert (b"transfer-encoding", b"chunked") not in r.raw


def test_host_alone_and_equal_host() -> None:
    no_authority = [h for h in BASE if h[0] != b":authority"]
    assert translate([*no_authority, (b"host", b"h")], True).raw[0] == (b"host", b"h")
    same = translate([*BASE, (b"host", b"svc.example:8443")], True)
    assert [n for n, _ in same.raw].count(b"host") == 1


def test_cookies_are_joined() -> None:
    r = translate([*BASE, (b"cookie", b"a=1"), (b"cookie", b"b=2")], True)
    assert (b"cookie", b"a=1; b=2") in r.raw


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ([*BASE, (b"Accept", b"x")], "lower-case"),
        ([*BASE, (b"x y", b"x")], "lower-case"),
        ([*BASE, (b"connection", b"close")], "connection-specific"),
        ([*BASE, (b"keep-alive", b"5")], "connection-specific"),
        ([*BASE, (b"proxy-connection", b"x")], "connection-specific"),
        ([*BASE, (b"transfer-encoding", b"chunked")], "connection-specific"),
        ([*BASE, (b"upgrade", b"websocket")], "connection-specific"),
        ([*BASE, (b"te", b"gzip")], "te other"),
        ([*BASE, (b"x", b"a\r\nx-forwarded-client-cert: evil")], "value"),
        ([*BASE, (b"x", b"a\x00")], "value"),
        ([*BASE, (b"x", b" padded")], "value"),
        ([*BASE, (b"x", b"padded\t")], "value"),
        ([(b"accept", b"x"), *BASE], "after a regular"),
        ([*BASE, (b":status", b"200")], "pseudo-header"),
        ([*BASE, (b":protocol", b"websocket")], "pseudo-header"),
        ([*BASE, (b":path", b"/again")], "repeated"),
        ([h for h in BASE if h[0] != b":path"], "missing"),
        ([h for h in BASE if h[0] != b":scheme"], "missing"),
        ([h for h in BASE if h[0] != b":method"], "missing"),
        ([(b":scheme", b"ftp"), *BASE[:1], *BASE[2:]], "scheme"),
        ([*BASE[:3], (b":path", b"a/b")], "origin form"),
        ([*BASE[:3], (b":path", b"*")], "origin form"),
        ([*BASE, (b"host", b"other")], "differ"),
        ([*BASE, (b"host", b"svc.example:8443"), (b"host", b"x")], "repeated host"),
        ([h for h in BASE if h[0] != b":authority"], "no :authority"),
        ([*BASE[:2], (b":authority", b""), BASE[3]], "not host[:port]"),
    ],
)
def test_malformed(headers: list[tuple[bytes, bytes]], detail: str) -> None:
    with pytest.raises(MalformedH2Request) as info:
        translate(headers, end_stream=True)
    assert detail in info.value.detail
    assert info.value.status == 400


def test_options_asterisk_and_connect() -> None:
    star = [
        (b":method", b"OPTIONS"),
        (b":scheme", b"https"),
        (b":authority", b"h"),
        (b":path", b"*"),
    ]
    assert translate(star, True).path == b"*"
    with pytest.raises(MethodNotAllowed):
        translate([(b":method", b"CONNECT"), (b":authority", b"h:443")], True)


def _prepared(headers: list[tuple[bytes, bytes]], end_stream: bool = True) -> bytes:
    r = translate(headers, end_stream)
    block = IdentityBlock(b"X-Client-Verified: SUCCESS\r\n", b"By=ours", "sanitize_set")
    return prepare(
        r.method,
        r.path,
        "1.1",
        r.raw,
        upgrade=False,
        client_ip=b"127.0.0.1",
        block=block,
        default_host=b"upstream",
        normalize=True,
        port=b"8443",
        underscores="drop",
        request_id=b"rid",
    ).head


def test_identity_lookalikes_never_reach_the_upstream() -> None:
    head = _prepared(
        [
            *BASE,
            (b"x-client-verified", b"SUCCESS-forged"),
            (b"x-forwarded-client-cert", b"Hash=evil"),
            (b"x-client_verified", b"forged"),
        ]
    )
    assert head.lower().count(b"x-client-verified") == 1
    assert b"forged" not in head and b"evil" not in head
    assert b"\r\nx-forwarded-client-cert: by=ours\r\n" in head.lower()  # ours, once
    assert head.startswith(b"GET /a?b=1 HTTP/1.1\r\n")


def test_undeclared_body_goes_chunked_to_the_upstream() -> None:
    post = [(b":method", b"POST"), *BASE[1:]]
    head = _prepared(post, end_stream=False)
    assert b"\r\nTransfer-Encoding: chunked\r\n" in head


def test_ambiguous_paths_are_refused_as_over_http1() -> None:
    with pytest.raises(BadRequest):
        _prepared([*BASE[:3], (b":path", b"/a/..;/admin")])


def test_authority_and_host_compare_case_insensitively_and_te_any_case() -> None:
    req = translate([*BASE, (b"host", b"SVC.example:8443"), (b"te", b"Trailers")], True)
    assert req.raw[0] == (b"host", b"svc.example:8443")  # :authority wins, sent once
    assert req.te_trailers


def test_repeated_equal_content_length_is_forwarded_once() -> None:
    post = [(b":method", b"POST"), *BASE[1:]]
    req = translate([*post, (b"content-length", b"5"), (b"content-length", b"5")], False)
    assert [v for n, v in req.raw if n == b"content-length"] == [b"5"]
    zero = translate([*post, (b"content-length", b"0")], True)  # no body, and says so
    assert (b"content-length", b"0") in zero.raw


@pytest.mark.parametrize("authority", [b"[::1]:8443", b"10.0.0.1", b"svc-a.example", b"svc:"])
def test_authority_forms_accepted(authority: bytes) -> None:
    headers = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority),
               (b":path", b"/")]  # fmt: skip
    assert translate(headers, True).raw[0] == (b"host", authority)
