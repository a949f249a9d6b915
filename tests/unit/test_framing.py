"""framing.py: the upstream response framer (pure core: 100 % line and branch coverage).

Every response is also fed one byte at a time and in every split into two reads: the events
(adjacent body pieces joined) must be the same as when it is fed whole (framing.py rule 1).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mtls_proxy.http1.framing import (
    LAST_CHUNK,
    MAX_LINE,
    MAX_RESPONSE_HEAD,
    ChunkedReader,
    EndOfMessage,
    Event,
    Head,
    ResponseFramer,
    Switch,
    encode_chunk,
)
from mtls_proxy.http1.response import (
    CHUNKED,
    LENGTH,
    NONE,
    UNTIL_CLOSE,
    MalformedResponse,
    parse_head,
)
from mtls_proxy.http1.websocket import accept_for

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
END = EndOfMessage(True)
END_CLOSE = EndOfMessage(False)
OK = b"HTTP/1.1 200 OK"
Outcome = list[object]


def head(raw: bytes, mode: int, length: int = 0) -> Head:
    return Head(parse_head(raw), mode, length)


def run(reads: list[bytes], is_head: bool = False, ws_key: bytes | None = None) -> Outcome:
    """Feed *reads* as the shell does; the outcome, normalised so that it cannot depend on how
    the bytes were split: adjacent body pieces joined, a Switch's rest moved out as tunnel data,
    bytes read after an EndOfMessage making it not reusable (the shell closes the connection),
    then the error or what eof() says."""
    framer = ResponseFramer(parse_head)
    framer.start(is_head, ws_key)
    out: list[Event] = []
    error = None
    reads = list(reads)
    try:
        while reads:
            events: list[Event] = []
            try:
                framer.feed(reads.pop(0), events)
            finally:
                out.extend(events)
            if out and isinstance(out[-1], EndOfMessage):
                if any(reads):
                    out[-1] = END_CLOSE
                break
        end: object = framer.eof()
    except MalformedResponse as exc:
        error = str(exc)
        end = ("error", error)
    norm: Outcome = []
    for ev in out:
        if isinstance(ev, Switch):
            norm.append(Switch(ev.head, b""))
            ev = ev.rest
        if isinstance(ev, bytes):
            if norm and isinstance(norm[-1], bytes):
                norm[-1] += ev
                continue
            if not ev:
                continue
        norm.append(ev)
    norm.append(end)
    return norm


def splits(data: bytes, every: bool = True) -> Iterator[list[bytes]]:
    """*data* whole, one byte per read, and in every split into two reads."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    positions = range(1, len(data)) if every else range(len(data) - 8, len(data))
    for i in positions:
        yield [data[:i], data[i:]]


def check(
    data: bytes, expected: Outcome, is_head: bool = False, ws_key: bytes | None = None
) -> None:
    """*data* gives *expected*, however it is split into reads."""
    for reads in splits(data):
        assert run(reads, is_head, ws_key) == expected, reads


# -- Content-Length, no body, until close -------------------------------------------------------
CL_CASES = [
    (
        "content-length",
        OK + b"\r\nContent-Length: 5\r\n\r\nhello",
        False,
        [head(OK + b"\r\nContent-Length: 5", LENGTH, 5), b"hello", END, None],
    ),
    (
        "bytes beyond the content-length are unsolicited",
        OK + b"\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n",
        False,
        [head(OK + b"\r\nContent-Length: 2", LENGTH, 2), b"ok", END_CLOSE, None],
    ),
    (
        "content-length 0",
        OK + b"\r\nContent-Length: 0\r\n\r\n",
        False,
        [head(OK + b"\r\nContent-Length: 0", LENGTH, 0), END, None],
    ),
    (
        "content-length 0, then bytes",
        OK + b"\r\nContent-Length: 0\r\n\r\nX",
        False,
        [head(OK + b"\r\nContent-Length: 0", LENGTH, 0), END_CLOSE, None],
    ),
    (
        "HTTP/1.0 is never reused",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        False,
        [head(b"HTTP/1.0 200 OK\r\nContent-Length: 2", LENGTH, 2), b"ok", END_CLOSE, None],
    ),
    (
        "Connection: close is never reused",
        OK + b"\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        False,
        [
            head(OK + b"\r\nConnection: close\r\nContent-Length: 2", LENGTH, 2),
            b"ok",
            END_CLOSE,
            None,
        ],
    ),
    (
        "a body on a HEAD response",
        OK + b"\r\nContent-Length: 5\r\n\r\nhello",
        True,
        [head(OK + b"\r\nContent-Length: 5", NONE), END_CLOSE, None],
    ),
    (
        "HEAD without a body",
        OK + b"\r\nContent-Length: 5\r\n\r\n",
        True,
        [head(OK + b"\r\nContent-Length: 5", NONE), END, None],
    ),
    (
        "a body on a 204",
        b"HTTP/1.1 204 No Content\r\n\r\nSMUGGLED",
        False,
        [head(b"HTTP/1.1 204 No Content", NONE), END_CLOSE, None],
    ),
    (
        "304",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
        False,
        [head(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9", NONE), END, None],
    ),
    (
        "until close",
        OK + b"\r\n\r\nall of it",
        False,
        [head(OK, UNTIL_CLOSE), b"all of it", END_CLOSE],
    ),
    ("until close, empty", OK + b"\r\n\r\n", False, [head(OK, UNTIL_CLOSE), END_CLOSE]),
    (
        "interim responses are skipped",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        + OK
        + b"\r\nContent-Length: 2\r\n\r\nok",
        False,
        [head(OK + b"\r\nContent-Length: 2", LENGTH, 2), b"ok", END, None],
    ),
    (
        "cut short in the body",
        OK + b"\r\nContent-Length: 5\r\n\r\nhel",
        False,
        [
            head(OK + b"\r\nContent-Length: 5", LENGTH, 5),
            b"hel",
            ("error", "connection closed before the end of the response"),
        ],
    ),
    (
        "cut short in the head",
        OK + b"\r\nContent-Length: 5\r\n",
        False,
        [("error", "connection closed before the end of the response")],
    ),
    (
        "cut short after an interim response",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2",
        False,
        [("error", "connection closed before the end of the response")],
    ),
    (
        "invalid status line",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        False,
        [("error", "invalid status line")],
    ),
    (
        "both Content-Length and Transfer-Encoding",
        OK + b"\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        False,
        [("error", "both Content-Length and Transfer-Encoding")],
    ),
]


@pytest.mark.parametrize(
    ("data", "is_head", "expected"), [c[1:] for c in CL_CASES], ids=[c[0] for c in CL_CASES]
)
def test_responses(data: bytes, is_head: bool, expected: Outcome) -> None:
    check(data, expected, is_head=is_head)


def test_a_read_within_the_body_is_passed_on_as_the_same_object() -> None:
    framer = ResponseFramer(parse_head)
    framer.start(False)
    events: list[Event] = []
    framer.feed(OK + b"\r\nContent-Length: 2000\r\n\r\n", events)
    piece = b"x" * 1000
    events.clear()
    framer.feed(piece, events)
    assert events == [piece] and events[0] is piece
    framer.feed(piece, events)
    assert events[1] is piece and events[2] == END
    assert framer.idle


def test_the_framer_serves_response_after_response() -> None:
    framer = ResponseFramer(parse_head)
    assert framer.idle and framer.eof() is None
    for data in (
        OK + b"\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        OK + b"\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n",
        OK + b"\r\nContent-Length: 1\r\n\r\nf",
    ):
        framer.start(False)
        assert not framer.idle
        events: list[Event] = []
        framer.feed(data, events)
        assert events[-1] == END and framer.idle


def test_empty_reads_change_nothing() -> None:
    framer = ResponseFramer(parse_head)
    events: list[Event] = []
    framer.feed(b"", events)  # idle
    framer.start(False)
    framer.feed(b"", events)  # waiting for the head
    framer.feed(OK + b"\r\nContent-Length: 1\r\n\r\n", events)
    framer.feed(b"", events)  # in the body
    assert events == [head(OK + b"\r\nContent-Length: 1", LENGTH, 1)]
    framer.feed(b"x", events)
    assert events[1:] == [b"x", END]


def test_bytes_while_no_response_is_expected() -> None:
    framer = ResponseFramer(parse_head)
    with pytest.raises(MalformedResponse, match="bytes while no response is expected"):
        framer.feed(b"HTTP/1.1 200 OK\r\n\r\n", [])


# -- chunked -------------------------------------------------------------------------------------
TE = OK + b"\r\nTransfer-Encoding: chunked"
CHUNKED_HEAD = head(TE, CHUNKED)


def chunked(body: bytes) -> bytes:
    return TE + b"\r\n\r\n" + body


CHUNKED_CASES = [
    ("one chunk", b"5\r\nhello\r\n0\r\n\r\n", [b"hello", END, None]),
    (
        "several chunks",
        b"5\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\n\r\n",
        [b"hello 0123456789", END, None],
    ),
    (
        "upper and lower case hex",
        b"a\r\n0123456789\r\nA\r\n0123456789\r\n0\r\n\r\n",
        [b"0123456789" * 2, END, None],
    ),
    ("15 hex digits", b"000000000000002\r\nok\r\n000000000000000\r\n\r\n", [b"ok", END, None]),
    ("extensions", b'2;name=value;q="a b"\t\r\nok\r\n0;last\r\n\r\n', [b"ok", END, None]),
    (
        "trailers are dropped",
        b"2\r\nok\r\n0\r\nX-Sum: 1\r\nX-Other: two\r\n\r\n",
        [b"ok", END, None],
    ),
    (
        "bytes after the last chunk",
        b"2\r\nok\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
        [b"ok", END_CLOSE, None],
    ),
    ("empty body", b"0\r\n\r\n", [END, None]),
    ("0x prefix", b"0x5\r\nhello\r\n0\r\n\r\n", [("error", "invalid chunk size line")]),
    ("plus sign", b"+5\r\nhello\r\n0\r\n\r\n", [("error", "invalid chunk size line")]),
    ("minus sign", b"-5\r\nhello\r\n0\r\n\r\n", [("error", "invalid chunk size line")]),
    ("leading space", b" 5\r\nhello\r\n0\r\n\r\n", [("error", "invalid chunk size line")]),
    ("trailing space", b"5 \r\nhello\r\n0\r\n\r\n", [("error", "invalid chunk size line")]),
    ("empty size", b"\r\nhello\r\n0\r\n\r\n", [("error", "invalid chunk size line")]),
    (
        "16 hex digits",
        b"0000000000000005\r\nhello\r\n0\r\n\r\n",
        [("error", "invalid chunk size line")],
    ),
    ("not hex", b"g\r\nhello\r\n0\r\n\r\n", [("error", "invalid chunk size line")]),
    (
        "control byte in an extension",
        b"5;a\x01b\r\nhello\r\n0\r\n\r\n",
        [("error", "invalid chunk size line")],
    ),
    (
        "bare LF in an extension",
        b"5;a\nb\r\nhello\r\n0\r\n\r\n",
        [("error", "invalid chunk size line")],
    ),
    (
        "DEL in an extension",
        b"5;a\x7f\r\nhello\r\n0\r\n\r\n",
        [("error", "invalid chunk size line")],
    ),
    ("extension without ;", b"5 x\r\nhello\r\n0\r\n\r\n", [("error", "invalid chunk size line")]),
    (
        "data longer than the size",
        b"5\r\nhelloXY\r\n0\r\n\r\n",
        [b"hello", ("error", "chunk data not followed by CRLF")],
    ),
    (
        "LF only after data",
        b"5\r\nhello\n0\r\n\r\n",
        [b"hello", ("error", "chunk data not followed by CRLF")],
    ),
    (
        "CR only after data",
        b"5\r\nhello\r0\r\n\r\n",
        [b"hello", ("error", "chunk data not followed by CRLF")],
    ),
    (
        "data shorter than the size",
        b"5\r\nhel\r\n0\r\n\r\n",
        [b"hel\r\n", ("error", "chunk data not followed by CRLF")],
    ),
    (
        "the good chunks come before the error",
        b"2\r\nok\r\nzz\r\n",
        [b"ok", ("error", "invalid chunk size line")],
    ),
    (
        "cut short in the data",
        b"5\r\nhel",
        [b"hel", ("error", "connection closed before the end of the response")],
    ),
    (
        "cut short in a size line",
        b"5\r\nhello\r\n1",
        [b"hello", ("error", "connection closed before the end of the response")],
    ),
    (
        "cut short in the trailers",
        b"0\r\nX: 1\r\n",
        [("error", "connection closed before the end of the response")],
    ),
    (
        "cut short before the CRLF",
        b"5\r\nhello\r",
        [b"hello", ("error", "connection closed before the end of the response")],
    ),
]


@pytest.mark.parametrize(
    ("body", "expected"), [c[1:] for c in CHUNKED_CASES], ids=[c[0] for c in CHUNKED_CASES]
)
def test_chunked(body: bytes, expected: Outcome) -> None:
    check(chunked(body), [CHUNKED_HEAD, *expected])


def test_chunked_connection_close_is_not_reused() -> None:
    raw = b"HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked"
    check(raw + b"\r\n\r\n2\r\nok\r\n0\r\n\r\n", [head(raw, CHUNKED), b"ok", END_CLOSE, None])


def test_a_read_of_chunk_data_only_is_passed_on_as_the_same_object() -> None:
    reader = ChunkedReader()
    events: list[Event] = []
    assert reader.read(b"a\r\n", events) is None and events == []
    piece = b"0123456789"
    assert reader.read(piece, events) is None
    assert events == [piece] and events[0] is piece
    assert reader.read(b"\r\n0\r\n\r\n", events) is True


# -- limits: exactly at the limit, and one over --------------------------------------------------
def _line(size: int) -> bytes:
    """A chunk-size line of exactly *size* bytes (an extension pads it)."""
    return b"2;x=" + b"y" * (size - 4)


@pytest.mark.parametrize("where", ["size", "trailer"])
def test_chunk_lines_up_to_max_line(where: str) -> None:
    def body(size: int) -> bytes:
        if where == "size":
            return _line(size) + b"\r\nok\r\n0\r\n\r\n"
        return b"2\r\nok\r\n0\r\nX-T: " + b"t" * (size - 5) + b"\r\n\r\n"

    assert len(_line(MAX_LINE)) == MAX_LINE
    check(chunked(body(MAX_LINE)), [CHUNKED_HEAD, b"ok", END, None])
    over = [CHUNKED_HEAD, *([] if where == "size" else [b"ok"]), ("error", "chunk line too long")]
    check(chunked(body(MAX_LINE + 1)), over)


def test_an_incomplete_chunk_line_is_refused_once_it_cannot_fit() -> None:
    # MAX_LINE + 1 bytes without CRLF may be a line of MAX_LINE and its CR: kept.
    assert run([chunked(_line(MAX_LINE) + b"\r")]) == [
        CHUNKED_HEAD,
        ("error", "connection closed before the end of the response"),
    ]
    assert run([chunked(_line(MAX_LINE + 1))]) == [
        CHUNKED_HEAD,
        ("error", "connection closed before the end of the response"),
    ]
    # One more byte cannot be a line of MAX_LINE any more: refused without waiting for the CRLF.
    assert run([chunked(_line(MAX_LINE + 2))]) == [CHUNKED_HEAD, ("error", "chunk line too long")]


def _big_head(size: int) -> bytes:
    """A valid response head of exactly *size* bytes (without its blank line)."""
    out = OK + b"\r\nContent-Length: 2"
    while len(out) < size:
        room = size - len(out) - len(b"\r\nX: ")
        out += b"\r\nX: " + b"v" * min(room, 8000)
    assert len(out) == size
    return out


def test_response_heads_up_to_max_response_head() -> None:
    raw = _big_head(MAX_RESPONSE_HEAD)
    expected: Outcome = [head(raw, LENGTH, 2), b"ok", END, None]
    for reads in splits(raw + b"\r\n\r\nok", every=False):
        if len(reads) <= 2:  # one byte at a time costs a copy of the head per byte: spared
            assert run(reads) == expected
    over = _big_head(MAX_RESPONSE_HEAD + 1) + b"\r\n\r\nok"
    for reads in splits(over, every=False):
        if len(reads) <= 2:
            assert run(reads) == [("error", "response head too large")]


def test_an_incomplete_head_is_refused_once_it_cannot_fit() -> None:
    raw = _big_head(MAX_RESPONSE_HEAD)
    # MAX_RESPONSE_HEAD + 3 bytes may still end in the first 3 bytes of the blank line: kept.
    assert run([raw + b"\r\n\r", b"\nok"]) == [head(raw, LENGTH, 2), b"ok", END, None]
    # One more byte, and the head is over the limit wherever the blank line comes.
    assert run([raw + b"\r\n\rX"]) == [("error", "response head too large")]


def test_heads_after_an_interim_response_have_their_own_limit() -> None:
    raw = _big_head(MAX_RESPONSE_HEAD)
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    assert run([interim + raw + b"\r\n\r\nok"]) == [head(raw, LENGTH, 2), b"ok", END, None]
    assert run([interim + raw + b"\r\n\r", b"\nok"]) == [head(raw, LENGTH, 2), b"ok", END, None]
    assert run([interim + raw + b"X\r\n\r\nok"]) == [("error", "response head too large")]
    assert run([interim + raw + b"\r\n\rX"]) == [("error", "response head too large")]


# -- 101: the only switch is to a WebSocket the client asked for ---------------------------------
SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: " + accept_for(KEY)
)


def test_a_valid_101_switches_to_a_tunnel() -> None:
    expected: Outcome = [Switch(parse_head(SWITCH), b""), b"\x81\x02hi", None]
    check(SWITCH + b"\r\n\r\n\x81\x02hi", expected, ws_key=KEY)
    framer = ResponseFramer(parse_head)
    framer.start(False, KEY)
    events: list[Event] = []
    framer.feed(SWITCH + b"\r\n\r\n", events)
    assert framer.tunnel and events == [Switch(parse_head(SWITCH), b"")]
    framer.feed(b"more", events)
    assert events[1] == b"more" and framer.eof() is None


def test_an_interim_response_before_a_101() -> None:
    expected: Outcome = [Switch(parse_head(SWITCH), b""), None]
    check(b"HTTP/1.1 100 Continue\r\n\r\n" + SWITCH + b"\r\n\r\n", expected, ws_key=KEY)


@pytest.mark.parametrize(
    ("data", "ws_key", "error"),
    [
        (SWITCH, None, "101 without an upgrade request"),
        (SWITCH, b"x" * 24, "101 with a wrong Sec-WebSocket-Accept"),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade",
            KEY,
            "101 without Upgrade: websocket and Connection: upgrade",
        ),
    ],
)
def test_other_101s_are_refused(data: bytes, ws_key: bytes | None, error: str) -> None:
    check(data + b"\r\n\r\n", [("error", error)], ws_key=ws_key)


# -- writer helpers, purity ----------------------------------------------------------------------
def test_chunk_encoding() -> None:
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n"
    assert encode_chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert encode_chunk(b"") == b""  # never an early last chunk
    assert LAST_CHUNK == b"0\r\n\r\n"
    framer = ResponseFramer(parse_head)
    framer.start(False)
    events: list[Event] = []
    framer.feed(chunked(encode_chunk(b"abc") + encode_chunk(b"") + LAST_CHUNK), events)
    assert events[1:] == [b"abc", END]
