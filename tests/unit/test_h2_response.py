"""http2/response.py: an HTTP/1.1 upstream's response head as an HTTP/2 HEADERS block."""

from __future__ import annotations

from mtls_proxy.http1.response import body_mode, parse_head
from mtls_proxy.http2.response import error_headers, h2_headers


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
