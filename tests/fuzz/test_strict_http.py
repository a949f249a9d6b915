"""The reference parser itself: what it accepts and what it refuses (strict_http.py rules)."""

from __future__ import annotations

import pytest

from tests.fuzz.strict_http import Reject, StrictParser

H = b"Host: a\r\n"
OK = [
    (b"GET / HTTP/1.1\r\n" + H + b"\r\n", 0),
    (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabc", 3),
    (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3;a=b\r\nabc\r\n0\r\n\r\n",
        3,
    ),
    (
        b"POST / HTTP/1.1\r\n"
        + H
        + b'Transfer-Encoding: Chunked\r\n\r\n1;q="x y"\r\na\r\n0\r\nT: v\r\n\r\n',
        1,
    ),
    (b"GET / HTTP/1.0\r\n\r\n", 0),
    (b"GET / HTTP/1.1\r\n" + H + b"Content_Length: 5\r\n\r\n", 0),  # an ordinary field here
]
REFUSED = [
    b"GET / HTTP/1.1\n" + H + b"\r\n",  # bare LF
    b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",  # bare CR
    b"\r\nGET / HTTP/1.1\r\n" + H + b"\r\n",  # leading empty line
    b"GET  / HTTP/1.1\r\n" + H + b"\r\n",
    b"GET / HTTP/1.2\r\n" + H + b"\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
    b"GET / HTTP/1.1\r\n" + H + H + b"\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"X : y\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + H + b"X: a\r\n b\r\n\r\n",  # obs-fold
    b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\na",
    b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +1\r\n\r\na",
    b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n 1\r\na\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1 ;a\r\na\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1\r\naXX0\r\n\r\n",
    b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\n",
    b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX : v\r\n\r\n",
]


@pytest.mark.parametrize(("data", "body"), OK)
def test_accepts_well_formed_requests_byte_by_byte(data: bytes, body: int) -> None:
    whole = StrictParser().feed(data)
    p = StrictParser()
    pieces = [r for i in range(len(data)) for r in p.feed(data[i : i + 1])]
    assert [r.body_len for r in whole] == [r.body_len for r in pieces] == [body]


@pytest.mark.parametrize("data", REFUSED)
def test_refuses_ambiguous_requests(data: bytes) -> None:
    with pytest.raises(Reject):
        StrictParser().feed(data)


def test_pipelined_requests_and_close() -> None:
    p = StrictParser()
    two = b"GET /a HTTP/1.1\r\n" + H + b"\r\nGET /b HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n"
    assert [r.target for r in p.feed(two + b"GET /c HTTP/1.1\r\n" + H + b"\r\n")] == ["/a", "/b"]
    assert p.closed and p.feed(b"GET /d HTTP/1.1\r\n\r\n") == []
