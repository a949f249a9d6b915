"""http2/response.py: an HTTP/1.1 upstream's response head as an HTTP/2 HEADERS block."""

from __future__ import annotations

import pytest

from mtls_proxy.http1.response import (
    CHUNKED,
    LENGTH,
    NONE,
    MalformedResponse,
    body_mode,
    parse_head,
)
from mtls_proxy.http2.response import error_headers, h1_head, h2_headers


def _h2(raw: bytes, is_head: bool = False) -> list[tuple[bytes, bytes]]:
    head = parse_head(raw)
    mode, length = body_mode(head, is_head)
    return h2_headers(head, mode, length)


def test_length_and_lower_case_names() -> None:
    out = _h2(
        b"HTTP/1.1 200 OK\r\nContent-Type:  text/plain \r\nX-Trace: a\r\n"
        b"Content-Length: 5\r\nX-B: 2"
    )
    assert out == [
        (b":status", b"200"),
        (b"content-type", b"text/plain"),
        (b"x-trace", b"a"),
        (b"x-b", b"2"),
        (b"content-length", b"5"),
    ]


def test_connection_specific_fields_never_reach_an_h2_client() -> None:
    out = _h2(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\n"
        b"X-Secret: s\r\nTransfer-Encoding: chunked\r\nUpgrade: h2c\r\nTrailer: x\r\nX-Ok: 1"
    )
    assert out == [(b":status", b"200"), (b"x-ok", b"1")]  # chunked: no length (rule 2)


def test_head_and_304_keep_the_upstreams_length_204_has_none() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 42"
    assert (b"content-length", b"42") in _h2(raw, is_head=True)
    assert (b"content-length", b"42") in _h2(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 42")
    assert all(
        n != b"content-length" for n, _ in _h2(b"HTTP/1.1 204 No Content\r\nContent-Length: 0")
    )


def test_close_delimited_body_has_no_length() -> None:
    assert _h2(b"HTTP/1.1 200 OK\r\nX-A: 1") == [(b":status", b"200"), (b"x-a", b"1")]


def test_error_headers() -> None:
    assert error_headers(403, 57) == [
        (b":status", b"403"),
        (b"content-type", b"application/json"),
        (b"content-length", b"57"),
    ]


# h1_head: an h2c upstream's HEADERS for an HTTP/1.1 client (rule 4).
def test_h1_head_framing_and_fields() -> None:
    fields = [(b"content-type", b"text/plain"), (b"keep-alive", b"x"), (b"x-a", b"1")]
    head, mode, length = h1_head([(b":status", b"200"), *fields], False)
    assert (head.status, head.reason, mode, length) == (200, b"OK", CHUNKED, 0)
    assert head.lines == [b"content-type: text/plain\r\n", b"x-a: 1\r\n"]
    sized = [(b":status", b"201"), (b"content-length", b"7"), (b"content-length", b"7")]
    assert h1_head(sized, False)[1:] == (LENGTH, 7)
    head, mode, _ = h1_head(sized, True)  # HEAD keeps the length it describes
    assert mode == NONE and head.content_length == [b"7"]
    for status in (b"204", b"304", b"103"):
        assert h1_head([(b":status", status)], False)[1] == NONE
    assert h1_head([(b":status", b"599")], False)[0].reason == b""


@pytest.mark.parametrize(
    "headers",
    [
        [(b":status", b"20")],
        [(b":status", b"abc")],
        [],
        [(b":status", b"200"), (b"content-length", b"1"), (b"content-length", b"2")],
        [(b":status", b"200"), (b"content-length", b"-1")],
        [(b":status", b"200"), (b"x", b"a\r\nInjected: 1")],
        [(b":status", b"200"), (b"x\n", b"a")],
    ],
)
def test_h1_head_refuses_malformed(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(MalformedResponse):
        h1_head(headers, False)
