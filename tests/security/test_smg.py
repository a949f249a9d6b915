"""docs/security.md, SMG: request smuggling and desync (SMG-001 .. SMG-066).

Refused payloads: the status, ``Connection: close``, the connection closed, and no byte at the
upstream. Accepted payloads: every request the upstream parsed is canonical (conftest.assert_canon).
SMG-066 re-sends every refused payload one byte per TLS record: the verdicts must not change.
"""

from __future__ import annotations

import json
import socket

import pytest

from tests.helpers import Pki, client_ctx, connect, read_response, run_proxy, serve_raw
from tests.security.conftest import Rig, assert_canon

P = b"POST / HTTP/1.1\r\nHost: a\r\n"
G = b"GET / HTTP/1.1\r\nHost: a\r\n"
TE = b"Transfer-Encoding: chunked\r\n\r\n"

# (id, payload, acceptable statuses)
REFUSED: list[tuple[str, bytes, set[int]]] = [
    ("SMG-001", P + b"Content-Length: 5\r\n" + TE + b"0\r\n\r\n", {400}),
    ("SMG-002", P + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", {400}),
    ("SMG-003", P + b"Content-Length: 1\r\nContent-Length: 0\r\n\r\nZ", {400}),
    ("SMG-004", P + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\nZ", {400}),
    ("SMG-005", P + b"Content-Length: 1, 1\r\n\r\nZ", {400}),
    *(
        (f"SMG-006 {v!r}", P + b"Content-Length: " + v + b"\r\n\r\n", {400})
        for v in (b"+1_0", b"0x10", b"-48", b"1Z", b"")
    ),
    ("SMG-007", P + b"Content-Length : 34\r\n\r\n", {400}),
    ("SMG-008", P + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", {400, 501}),
    ("SMG-009", P + b"Transfer-Encoding: chunked\r\n" + TE + b"0\r\n\r\n", {400}),
    ("SMG-010", P + b"Transfer-Encoding: ,chunked\r\n\r\n0\r\n\r\n", {400, 501}),
    ("SMG-011", P + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", {400, 501}),
    ("SMG-012", P + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", {400, 501}),
    ("SMG-013", P + b"Transfer-Encoding: identity\r\nContent-Length: 1\r\n\r\nZ", {400, 501}),
    ("SMG-014", P + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", {501}),
    ("SMG-016", P + b"Transfer-Encoding: \xa0chunked\xa0\r\n\r\n0\r\n\r\n", {400, 501}),
    ("SMG-018", b"POST / HTTP/1.0\r\nHost: a\r\n" + TE + b"0\r\n\r\n", {400}),
    ("SMG-019", P + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", {400}),
    ("SMG-020", P + b"Transfer-\r\nEncoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", {400}),
    *(
        (f"SMG-021 {v!r}", P + TE + v + b"\r\nZZ\r\n0\r\n\r\n", {400})
        for v in (b"0_2e", b"-0x0", b"+1", b"   0", b"1  ", b"", b"FFFFFFFFFFFFFFFFFFFF")
    ),
    ("SMG-023", P + TE + b"1;a\nb\r\nZ\r\n0\r\n\r\n", {400}),
    ("SMG-024", P + TE + b"2\r\r;a\r\n02\r\n0\r\n\r\n", {400}),
    ("SMG-025 data LF", P + TE + b"a\r\n0123456789\n0\r\n\r\n", {400}),
    ("SMG-025 size LF", P + TE + b"1\nZ\r\n0\r\n\r\n", {400}),
    ("SMG-025 last LF", P + TE + b"0\n\r\n", {400}),
    ("SMG-026", P + TE + b"1\r\nZX0\r\n\r\n", {400}),
    ("SMG-027", b"GET / HTTP/1.1\nHost: a\n\n", {400}),
    ("SMG-028 CR", G + b"X: a\rb\r\n\r\n", {400}),
    ("SMG-028 CR header", G + b"Visible: :/\rSmuggled: :)\r\n\r\n", {400}),
    ("SMG-029", G + b"X: a\x00b\r\n\r\n", {400}),
    ("SMG-031 0x85 name", G + b"X\x85: v\r\n\r\n", {400}),
    ("SMG-031 space name", G + b"X Client: v\r\n\r\n", {400}),
    ("SMG-032 empty name", G + b": v\r\n\r\n", {400}),
    ("SMG-032 no colon", G + b"Content-Length 10\r\n\r\n", {400}),
    ("SMG-033", b"GET / HTTP/1.1\r\n\tContent-Length: 1\r\nHost: a\r\n\r\nZ", {400}),
    ("SMG-034", G + b"\rZGET /evil: HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("SMG-035", G + b"Host: b\r\n\r\n", {400}),
    ("SMG-036", b"GET / HTTP/1.1\r\n\r\n", {400}),
    ("SMG-037", b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n", {400}),
    ("SMG-038 http:/x", b"GET http:/x HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("SMG-038 http:///x", b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("SMG-039", b"GET evil.test:80 HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("SMG-040", b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n", {405, 400}),
    ("SMG-042", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("SMG-044", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", {505, 400}),
    ("SMG-045 1.32", b"GET / HTTP/1.32\r\nHost: a\r\n\r\n", {400, 505}),
    ("SMG-045 lower", b"GET / http/1.1\r\nHost: a\r\n\r\n", {400, 505}),
    ("SMG-046 LF", b"GET /\nHTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("SMG-046 tab", b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("SMG-048 get", b"get / HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("SMG-048 non-token", b'G=":<>(e),[T];? / HTTP/1.1\r\nHost: a\r\n\r\n', {400}),
    ("SMG-049 0x01", b"GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("SMG-049 0xff", b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("SMG-056", G + b"Expect: y\r\n\r\n", {417}),
    ("SMG-064", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", {414}),
    ("SMG-065 long line", G + b"X-Long: " + b"b" * 9000 + b"\r\n\r\n", {431}),
    ("SMG-065 130 fields", G + b"".join(b"X-%d: v\r\n" % i for i in range(130)) + b"\r\n", {431}),
]


def _refused(rig: Rig, payload: bytes, statuses: set[int], per_byte: bool) -> None:
    before = len(rig.upstream.seen)
    out = rig.exchange(payload, per_byte=per_byte)
    head = out.partition(b"\r\n\r\n")[0]
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None
    assert status in statuses, out[:300]
    assert b"\r\nConnection: close" in head
    assert rig.new_requests(before) == []  # no upstream bytes


@pytest.mark.parametrize(
    ("payload", "statuses"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_refused(rig: Rig, payload: bytes, statuses: set[int]) -> None:
    _refused(rig, payload, statuses, per_byte=False)


@pytest.mark.parametrize(
    ("payload", "statuses"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_smg066_one_byte_per_record_same_verdict(
    rig: Rig, payload: bytes, statuses: set[int]
) -> None:
    _refused(rig, payload, statuses, per_byte=True)


def _forwarded(rig: Rig, payload: bytes, count: int = 1) -> tuple[bytes, list]:  # type: ignore[type-arg]
    before = len(rig.upstream.seen)
    out = rig.exchange(payload, timeout=2)
    new = rig.new_requests(before)
    assert len(new) == count, (out[:300], new)
    for seen in new:
        assert_canon(seen)
    return out, new


CLOSE = b"Connection: close\r\n"


def split_responses(out: bytes) -> list[tuple[int, bytes]]:
    """Responses with Content-Length framing, in the order they arrived."""
    res = []
    while out:
        head, _, rest = out.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(
            int(v)
            for k, _, v in (ln.partition(b":") for ln in lines[1:])
            if k.lower() == b"content-length"
        )
        res.append((int(lines[0].split(b" ")[1]), rest[:length]))
        out = rest[length:]
    return res


def test_smg015_uppercase_chunked_is_chunked(rig: Rig) -> None:
    out, new = _forwarded(rig, P + CLOSE + b"Transfer-Encoding: CHUNKED\r\n\r\n1\r\nZ\r\n0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and new[0].body_len == 1


def test_smg017_tab_before_chunked(rig: Rig) -> None:
    out, new = _forwarded(
        rig, P + CLOSE + b"Transfer-Encoding:\tchunked\r\n\r\n1\r\nZ\r\n0\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 200") and new[0].body_len == 1


def test_smg022_chunk_extensions_are_not_forwarded(rig: Rig) -> None:
    conns = set(rig.upstream.raw)
    out, new = _forwarded(rig, P + CLOSE + TE + b"1;a=b\r\nZ\r\n0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and new[0].body_len == 1
    raw = b"".join(
        bytes(v) for k, v in rig.upstream.raw.items() if k not in conns or k == new[0].conn_id
    )
    assert b";a=b" not in raw


def test_smg030_high_bytes_in_values_are_preserved(rig: Rig) -> None:
    out, new = _forwarded(rig, G + CLOSE + b"User: \x85admin\xa0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")
    assert new[0].one("user").encode("latin-1") == b"\x85admin\xa0"


def test_smg038_absolute_form_becomes_origin_form(rig: Rig) -> None:
    for scheme in (b"http", b"https"):
        _out, new = _forwarded(
            rig, b"GET " + scheme + b"://evil.test/x?q=1 HTTP/1.1\r\nHost: a\r\n" + CLOSE + b"\r\n"
        )
        assert new[0].target == "/x?q=1" and new[0].one("host") == "a"


def test_smg041_options_star_stays_star(rig: Rig) -> None:
    _out, new = _forwarded(rig, b"OPTIONS * HTTP/1.1\r\nHost: a\r\n" + CLOSE + b"\r\n")
    assert new[0].method == "OPTIONS" and new[0].target == "*"


def test_smg043_http09_is_never_forwarded(rig: Rig) -> None:
    before = len(rig.upstream.seen)
    out = rig.exchange(b"GET /\r\n", timeout=5)
    assert out == b"" or out.startswith((b"HTTP/1.1 400", b"HTTP/1.1 408"))
    assert rig.new_requests(before) == []


def test_smg047_two_spaces_refused_or_canonical(rig: Rig) -> None:
    before = len(rig.upstream.seen)
    out = rig.exchange(b"GET  / HTTP/1.1\r\nHost: a\r\n" + CLOSE + b"\r\n")
    new = rig.new_requests(before)
    if new:  # accepted: then canonical, and answered
        assert out.startswith(b"HTTP/1.1 200") and len(new) == 1
        assert_canon(new[0])
    else:  # refused
        assert out.startswith(b"HTTP/1.1 400")


def test_smg048_token_method_is_never_case_normalised(rig: Rig) -> None:
    before = len(rig.upstream.seen)
    out = rig.exchange(b"FOO / HTTP/1.1\r\nHost: a\r\n" + CLOSE + b"\r\n")
    new = rig.new_requests(before)
    assert (out.startswith(b"HTTP/1.1 400") and new == []) or [s.method for s in new] == ["FOO"]


def test_smg050_fragment_is_dropped(rig: Rig) -> None:
    _, new = _forwarded(rig, b"GET /a#b HTTP/1.1\r\nHost: a\r\n" + CLOSE + b"\r\n")
    assert new[0].target == "/a"


def test_smg051_get_with_a_body_keeps_it(rig: Rig) -> None:
    _out, new = _forwarded(rig, G + CLOSE + b"Content-Length: 10\r\n\r\n0123456789")
    assert new[0].body_len == 10 and new[0].one("content-length") == "10"


def test_smg052_cl0_then_a_second_request_are_two_requests(rig: Rig) -> None:
    payload = (
        P + b"Content-Length: 0\r\n\r\n" + b"GET /second HTTP/1.1\r\nHost: a\r\n" + CLOSE + b"\r\n"
    )
    out, new = _forwarded(rig, payload, count=2)
    assert [s.target for s in new] == ["/", "/second"] and out.count(b"HTTP/1.1 200") == 2


def test_smg053_valid_then_invalid_is_one_answer_then_400(rig: Rig) -> None:
    out, _new = _forwarded(rig, G + b"\r\nInvalid\r\n\r\n")
    assert out.count(b"HTTP/1.1 200") == 1 and b"HTTP/1.1 400" in out


def test_smg054_pipelined_requests_are_answered_in_order(rig: Rig) -> None:
    n = 2000  # also RES-19: thousands pipelined on one connection, answered in order
    payload = b"".join(b"GET /p%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(n))
    out, _new = _forwarded(
        rig, payload + b"GET /last HTTP/1.1\r\nHost: a\r\n" + CLOSE + b"\r\n", count=n + 1
    )
    targets = [json.loads(body)["target"] for status, body in split_responses(out)]
    assert targets == [f"/p{i}" for i in range(n)] + ["/last"]


def test_smg055_expect_100_is_answered_once_and_not_forwarded(rig: Rig) -> None:
    before = len(rig.upstream.seen)
    with connect(rig.port, rig.good()) as s:
        s.sendall(P + b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        buf = bytearray()
        assert read_response(s, buf)[0] == 100
        s.sendall(b"abc")
        assert read_response(s, buf)[0] == 200
    new = rig.new_requests(before)
    assert len(new) == 1 and new[0].get("expect") == [] and new[0].body_len == 3
    assert_canon(new[0])


def test_smg060_h2c_upgrade_is_stripped(rig: Rig) -> None:
    _, new = _forwarded(
        rig, G + CLOSE + b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
    )
    assert new[0].get("upgrade") == [] and new[0].get("http2-settings") == []


def test_smg061_upgrade_without_connection_upgrade_is_plain(rig: Rig) -> None:
    _, new = _forwarded(rig, P + CLOSE + b"Upgrade: websocket\r\nContent-Length: 2\r\n\r\nhi")
    assert new[0].get("upgrade") == [] and new[0].body_len == 2


def test_smg062_stalled_body_gets_408_and_the_upstream_request_is_aborted(rig: Rig) -> None:
    before = len(rig.upstream.seen)
    out = rig.exchange(P + b"Content-Length: 10\r\n\r\n01234", timeout=6)
    assert out.startswith(b"HTTP/1.1 408"), out[:200]
    assert rig.new_requests(before) == []  # the upstream never saw a complete request


def test_smg057_early_413_after_expect_never_reuses_that_upstream_connection(tp: Pki) -> None:
    heads: list[tuple[int, bytes]] = []  # (upstream connection number, request head)

    def answer(conn: socket.socket, n: int) -> None:
        buf = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\r\n\r\n" in buf:
                head, _, buf = buf.partition(b"\r\n\r\n")
                heads.append((n, head))
                if head.startswith(b"POST /big"):
                    # Answer before the body: the body bytes that follow must never be read
                    # as the next request on this connection.
                    conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
                    buf = b""
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    srv = serve_raw(answer)
    try:
        with run_proxy(tp, f"http://127.0.0.1:{srv.getsockname()[1]}") as p:
            ctx = client_ctx(tp, "good")
            with connect(p.port, ctx) as s:
                s.sendall(
                    b"POST /big HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                    b"Content-Length: 100000\r\n\r\n"
                )
                buf = bytearray()
                status = read_response(s, buf)[0]
                if status == 100:
                    s.sendall(b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n".ljust(100000, b"x"))
                    status = read_response(s, buf)[0]
                assert status == 413
            with connect(p.port, ctx) as s:
                s.sendall(b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                assert read_response(s, bytearray())[0] == 200
            # Whatever the upstream made of the body it did not wait for, /next went to a
            # fresh upstream connection and got its own answer.
            assert heads[0][0] == 1 and heads[0][1].startswith(b"POST /big ")
            assert [n for n, h in heads if h.startswith(b"GET /next ")] == [2], [
                (n, h[:40]) for n, h in heads
            ]
    finally:
        srv.close()
