"""PURE. HTTP/1.1 response framing: where each upstream response head and body start and end.

The sans-I/O half of upstream.py, in the style of h11's readers: bytes in, events out (a
``Head``, body pieces as ``bytes``, an ``EndOfMessage``, or a ``Switch`` to a tunnel), and
``MalformedResponse`` at a framing error.

Rules:
1. A head is at most MAX_RESPONSE_HEAD bytes before its blank line, and a chunk-size or trailer
   line at most MAX_LINE bytes before its CRLF, however the bytes are split into reads: the
   events never depend on the split (UPS-010).
2. 1xx heads are validated and skipped (the proxy never sends Expect); a 101 is accepted only
   as the answer to a WebSocket upgrade (websocket.check_switch) and ends the framing: every
   later byte is tunnel data (UPS-008, SMG-059).
3. The body is framed as body_mode (response.py) says: none (HEAD, 204, 304), Content-Length,
   chunked or until the connection closes; a body cut short by the close is an error.
4. Chunked: a size of 1 to 15 hex digits (no sign, prefix or spaces), extensions without
   control bytes, CRLF after the data; trailers are read and dropped, never forwarded (UPS-005).
5. Any byte after the end of a response (beyond the Content-Length, after the last chunk's
   trailers, after a head without a body) makes the connection not reusable, and so do an
   HTTP/1.0 response and ``Connection: close`` (UPS-006/007).
6. The hot path copies nothing it need not: a body read that belongs entirely to the body is
   passed on as the same bytes object, and chunked bodies are cut by offsets, not re-sliced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from mtls_proxy.http1.response import CHUNKED, LENGTH, NONE, MalformedResponse, body_mode
from mtls_proxy.http1.websocket import check_switch

if TYPE_CHECKING:
    from collections.abc import Callable

    from mtls_proxy.http1.response import BodyMode, ResponseHead

MAX_RESPONSE_HEAD: Final = 65536
MAX_LINE: Final = 8192
LAST_CHUNK: Final = b"0\r\n\r\n"
_CHUNK_SIZE: Final = re.compile(rb"([0-9A-Fa-f]{1,15})(;[^\x00-\x08\x0a-\x1f\x7f]*)?")


def encode_chunk(data: bytes) -> bytes:
    """*data* as one chunk of a chunked body; nothing for no data, since an empty chunk would
    be the last one (LAST_CHUNK) and end the body early."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


# -- events ------------------------------------------------------------------------------------
# A piece of the decoded body (or, after a Switch, of the tunnel) is the bytes object itself: an
# event object per piece would cost more than the rest of the hot path (rule 6).


@dataclass(slots=True)
class Head:
    """The final response head, with its body's framing (response.body_mode)."""

    head: ResponseHead
    mode: BodyMode
    length: int


@dataclass(slots=True, frozen=True)
class EndOfMessage:
    """The response is complete; *reusable*: the connection may serve another request (rule 5)."""

    reusable: bool


@dataclass(slots=True)
class Switch:
    """A valid 101 to a WebSocket upgrade; *rest*: tunnel bytes that came in the same read."""

    head: ResponseHead
    rest: bytes


Event = Head | bytes | EndOfMessage | Switch
_REUSABLE: Final = EndOfMessage(True)
_NOT_REUSABLE: Final = EndOfMessage(False)

# -- chunked bodies ----------------------------------------------------------------------------
_SIZE, _DATA, _CRLF, _TRAILER = range(4)  # ChunkedReader states


class ChunkedReader:
    """A chunked body (rule 4): size lines, data, CRLF, ..., a zero size, trailers, a blank line."""

    __slots__ = ("_buf", "_remaining", "_state")

    def __init__(self) -> None:
        self._state = _SIZE
        self._remaining = 0  # data bytes left in the current chunk
        self._buf = b""  # the start of an incomplete line or CRLF, kept for the next read

    def read(self, data: bytes, events: list[Event]) -> bool | None:
        """Append the chunk data in *data* to *events*; None while the body goes on, else (the
        blank line after the trailers) whether nothing followed it in *data*."""
        if self._buf:
            data, self._buf = self._buf + data, b""
        pos, n = 0, len(data)
        while pos < n:
            state = self._state
            if state == _DATA:
                take = min(n - pos, self._remaining)
                events.append(data if take == n else data[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _CRLF
            elif state == _CRLF:
                if n - pos < 2:
                    break
                if not data.startswith(b"\r\n", pos):
                    raise MalformedResponse("chunk data not followed by CRLF")
                pos += 2
                self._state = _SIZE
            else:  # _SIZE or _TRAILER: a line
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    # MAX_LINE + 1 bytes may still be a line of MAX_LINE and the CR of its CRLF:
                    # refusing them here would make the limit depend on the split (rule 1).
                    if n - pos > MAX_LINE + 1:
                        raise MalformedResponse("chunk line too long")
                    break
                if eol - pos > MAX_LINE:
                    raise MalformedResponse("chunk line too long")
                start, pos = pos, eol + 2
                if state == _TRAILER:
                    if eol == start:  # the blank line: the trailers were dropped (rule 4)
                        return pos == n
                    continue
                m = _CHUNK_SIZE.fullmatch(data, start, eol)
                if m is None:
                    raise MalformedResponse("invalid chunk size line")
                size = int(m.group(1), 16)
                self._state, self._remaining = (_DATA, size) if size else (_TRAILER, 0)
        self._buf = data[pos:]
        return None


# -- the response framer -----------------------------------------------------------------------
# ResponseFramer states: no response expected, reading heads, the three kinds of body, a tunnel.
_IDLE, _HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _TUNNEL = range(6)


class ResponseFramer:
    """Frames the responses of one upstream connection, one at a time.

    start() before each response; feed() every read and deliver the events it appends; eof()
    when the upstream closes. A feed stops at an EndOfMessage (what follows in the read only
    made it not reusable), so the consumer may start() the next response while delivering it.
    After a MalformedResponse the connection is unusable: close it.
    """

    __slots__ = (
        "_buf",
        "_chunked",
        "_is_head",
        "_keep_alive",
        "_parse",
        "_remaining",
        "_state",
        "_ws_key",
    )

    def __init__(self, parse_head: Callable[[bytes], ResponseHead]) -> None:
        self._parse = parse_head  # response.parse_head, or a HeadCache's parse
        self._state = _IDLE
        self._buf = b""  # the start of an incomplete head, kept for the next read
        self._is_head = False
        self._ws_key: bytes | None = None
        self._keep_alive = False
        self._remaining = 0  # of a Content-Length body
        self._chunked = ChunkedReader()

    @property
    def idle(self) -> bool:
        """No response is expected (none started, or the last one ended)."""
        return self._state == _IDLE

    @property
    def tunnel(self) -> bool:
        """A 101 switched the connection to a tunnel."""
        return self._state == _TUNNEL

    def start(self, is_head: bool, ws_key: bytes | None = None) -> None:
        """Expect the response to a request (*is_head*: a HEAD; *ws_key*: a WebSocket upgrade's
        Sec-WebSocket-Key, the only request a 101 may answer)."""
        self._state, self._buf, self._is_head, self._ws_key = _HEAD, b"", is_head, ws_key

    def feed(self, data: bytes, events: list[Event]) -> None:
        """Append the events in one read of the upstream's bytes to *events*.

        At a framing error the events before it are in *events* (the consumer delivers them,
        as if they had been handed over one by one) and MalformedResponse is raised. Not a
        generator, and the Content-Length body inline: on this hot path a generator or a call
        per read costs as much as the rest of it.
        """
        state = self._state
        if state == _HEAD and data:
            data = self._heads(data, events)  # what follows the final head: the body
            state = self._state
        if state == _LENGTH and data:
            n, left = len(data), self._remaining
            if n < left:
                self._remaining = left - n
                events.append(data)  # the same object: no copy (rule 6)
                return
            self._state = _IDLE  # the rest of *data*, if any, is unsolicited (rule 5)
            events.append(data if n == left else data[:left])
            events.append(_REUSABLE if n == left and self._keep_alive else _NOT_REUSABLE)
        elif not data or state == _HEAD:  # an incomplete head, or the end of the response
            return
        elif state == _CHUNKED:
            end = self._chunked.read(data, events)
            if end is not None:
                self._state = _IDLE
                events.append(_REUSABLE if end and self._keep_alive else _NOT_REUSABLE)
        elif state in (_UNTIL_CLOSE, _TUNNEL):
            events.append(data)
        else:
            raise MalformedResponse("bytes while no response is expected")

    def eof(self) -> EndOfMessage | None:
        """The upstream closed: the end of a close-delimited body, or None when no response
        was in flight (or a tunnel ended); MalformedResponse when one was cut short."""
        state = self._state
        if state in (_IDLE, _TUNNEL):
            return None
        if state != _UNTIL_CLOSE:
            raise MalformedResponse("connection closed before the end of the response")
        self._state = _IDLE
        return _NOT_REUSABLE

    def _heads(self, data: bytes, events: list[Event]) -> bytes:
        """Read heads up to the final one (or a 101); return the body bytes after it."""
        if self._buf:
            data, self._buf = self._buf + data, b""
        pos = 0
        while True:
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                # The blank line of a head of MAX_RESPONSE_HEAD bytes may start in the last
                # 3 bytes: refusing fewer than that many more would depend on the split (rule 1).
                if len(data) - pos > MAX_RESPONSE_HEAD + 3:
                    raise MalformedResponse("response head too large")  # UPS-010
                self._buf = data[pos:] if pos else data
                return b""
            if end - pos > MAX_RESPONSE_HEAD:
                raise MalformedResponse("response head too large")
            raw = data[pos:end]
            head = self._parse(raw)
            pos = end + 4
            if head.status >= 200:
                break
            if head.status == 101:
                if self._ws_key is None:
                    raise MalformedResponse("101 without an upgrade request")
                check_switch(raw, self._ws_key)
                self._state = _TUNNEL  # the connection never returns to the pool
                events.append(Switch(head, data[pos:]))
                return b""
            # Another 1xx: interim, not relayed (rule 2); the final head follows.
        self._keep_alive = not head.http10 and not head.close
        mode, length = body_mode(head, self._is_head)
        events.append(Head(head, mode, length))
        if mode == NONE or (mode == LENGTH and length == 0):
            self._state = _IDLE  # any byte after the head is unsolicited (rule 5)
            events.append(_REUSABLE if self._keep_alive and pos == len(data) else _NOT_REUSABLE)
            return b""
        if mode == LENGTH:
            self._state, self._remaining = _LENGTH, length
        elif mode == CHUNKED:
            self._state, self._chunked = _CHUNKED, ChunkedReader()
        else:
            self._state = _UNTIL_CLOSE
        return data[pos:]
