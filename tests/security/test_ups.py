"""docs/security.md, UPS: a hostile or broken upstream (UPS-001 .. UPS-013).

The upstream answers ``/raw`` with canned bytes and closes. The client must get either a
re-framed, canonical response or a 502 (or an aborted body once a response has started), and
the next request, on a fresh client connection, must get its own answer."""

from __future__ import annotations

import gzip
import json

import pytest

from tests.security.conftest import Rig

REQ = b"GET /raw HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
BAD_GATEWAY = [
    (
        "UPS-001",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    ("UPS-002", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
    ("UPS-004 NUL", b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n"),
    ("UPS-004 CR", b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 0\r\n\r\n"),
    ("UPS-008 101 unasked", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"),
    (
        "UPS-010 head > 64 KiB",
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))
        + b"Content-Length: 0\r\n\r\n",
    ),
    (
        "UPS-010 line > 8 KiB",
        b"HTTP/1.1 200 OK\r\nX: " + b"v" * 9000 + b"\r\nContent-Length: 0\r\n\r\n",
    ),
    ("UPS-012 2000", b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n"),
    ("UPS-012 ICE", b"ICE/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
]


def _next_request_is_clean(rig: Rig) -> None:
    out = rig.exchange(b"GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ")
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["target"] == "/after"


def _raw(rig: Rig, response: bytes, request: bytes = REQ) -> bytes:
    rig.upstream.raw_response = response
    return rig.exchange(request)


@pytest.mark.parametrize("response", [b[1] for b in BAD_GATEWAY], ids=[b[0] for b in BAD_GATEWAY])
def test_broken_responses_get_502(rig: Rig, response: bytes) -> None:
    out = _raw(rig, response)
    assert out.startswith(b"HTTP/1.1 502 "), out[:200]
    assert b"\x00" not in out and b"Transfer-Encoding: chunked\r\nContent-Length" not in out
    _next_request_is_clean(rig)


def test_ups003_bare_lf_is_reserialized_or_refused(rig: Rig) -> None:
    out = _raw(rig, b"HTTP/1.1 200 OK\nContent-Length: 2\nX: y\n\nok")
    head = out.partition(b"\r\n\r\n")[0]
    assert out.startswith(b"HTTP/1.1 502 ") or (
        out.startswith(b"HTTP/1.1 200 ") and b"\n" not in head.replace(b"\r\n", b"")
    )
    _next_request_is_clean(rig)


def test_ups005_malformed_chunked_body_aborts_the_client(rig: Rig) -> None:
    out = _raw(rig, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
    assert not out.endswith(b"0\r\n\r\n")  # never a well-formed (truncated) response
    assert out.startswith(b"HTTP/1.1 200 ") or out.startswith(b"HTTP/1.1 502 ")
    _next_request_is_clean(rig)


def test_ups006_body_on_head_or_204_is_not_forwarded(rig: Rig) -> None:
    out = _raw(
        rig,
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloSMUGGLED",
        b"HEAD /raw HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 200 ") and b"hello" not in out and b"SMUGGLED" not in out
    out = _raw(rig, b"HTTP/1.1 204 No Content\r\n\r\nSMUGGLED")
    assert out.startswith(b"HTTP/1.1 204 ") and b"SMUGGLED" not in out
    _next_request_is_clean(rig)


def test_ups007_unsolicited_second_response_is_discarded(rig: Rig) -> None:
    out = _raw(
        rig,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nINJECTED",
    )
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"ok") and b"INJECTED" not in out
    for _ in range(3):
        _next_request_is_clean(rig)


def test_ups008_interim_responses_give_one_final_status(rig: Rig) -> None:
    out = _raw(
        rig,
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    )
    finals = [s for s in (b"HTTP/1.1 200 ", b"HTTP/1.1 502 ") if s in out]
    assert len(finals) == 1 and out.count(b"HTTP/1.1 200 ") <= 1
    _next_request_is_clean(rig)


def test_ups009_close_delimited_body_is_forwarded_completely(rig: Rig) -> None:
    body = b"x" * 100_000
    out = _raw(rig, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)
    head, _, rest = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    if b"Transfer-Encoding: chunked" in head:
        data, rest2 = b"", rest
        while True:
            size_line, _, rest2 = rest2.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            data += rest2[:size]
            rest2 = rest2[size + 2 :]
        assert data == body
    else:
        assert rest == body


def test_ups011_compressed_bodies_pass_through_untouched(rig: Rig) -> None:
    bomb = gzip.compress(b"\0" * 10_000_000)
    out = _raw(
        rig,
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bomb)
        + bomb,
    )
    assert out.endswith(bomb) and b"Content-Encoding: gzip" in out


def test_ups012_missing_reason_phrase_is_reserialized(rig: Rig) -> None:
    out = _raw(rig, b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok")
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"ok")


def test_ups013_hop_by_hop_response_headers_are_removed(rig: Rig) -> None:
    out = _raw(
        rig,
        b"HTTP/1.1 200 OK\r\nConnection: X-Foo\r\nX-Foo: 1\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nok",
    )
    head = out.partition(b"\r\n\r\n")[0].lower()
    assert b"x-foo" not in head and b"keep-alive" not in head and b"proxy-connection" not in head
    assert b"x-kept: yes" in head
