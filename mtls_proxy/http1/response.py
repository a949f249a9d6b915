"""PURE. HTTP/1.1 response heads: strict parsing of the upstream's, re-framing for the client.

Rules:
1. The upstream's head is validated as a whole (no control bytes, no bare CR or LF, token field
   names, a valid status line); anything else is a 502 (docs/security.md, UPS-003/004/012).
2. Hop-by-hop fields and the fields the upstream's ``Connection`` nominates never reach the client;
   framing (Content-Length / Transfer-Encoding) is always the proxy's own (UPS-013, HDR-023).
3. Ambiguous framing (CL with TE, conflicting CLs, codings other than chunked) is a 502 (UPS-001/2).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Final

from mtls_proxy.core.headers import HOP_BY_HOP

if TYPE_CHECKING:
    from collections.abc import Iterator


class BodyMode(IntEnum):
    """How a response body is framed (RFC 9112 §6.3), as body_mode finds it."""

    NONE = 0  # no body: HEAD, 1xx, 204, 304
    LENGTH = 1  # Content-Length
    CHUNKED = 2  # Transfer-Encoding: chunked
    UNTIL_CLOSE = 3  # delimited by the connection's close


# Module-level names for the hot path: a global lookup, not an attribute of the enum class.
NONE: Final = BodyMode.NONE
LENGTH: Final = BodyMode.LENGTH
CHUNKED: Final = BodyMode.CHUNKED
UNTIL_CLOSE: Final = BodyMode.UNTIL_CLOSE

_CTL: Final = bytes([*range(0, 9), *range(10, 32), 127])
_NOT_CTL: Final = bytes(b for b in range(256) if b not in _CTL or b in (10, 13))
_MAX_LINE: Final = 8192
REASONS: Final = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    417: b"Expectation Failed",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


class MalformedResponse(ValueError):
    """The upstream broke HTTP/1.1 syntax or framing."""


@dataclass(slots=True)
class ResponseHead:
    """A validated upstream response head, filtered for the client."""

    status: int
    reason: bytes
    http10: bool
    lines: list[bytes] = field(default_factory=list)  # forwarded fields, each ending in CRLF
    content_length: list[bytes] = field(default_factory=list)
    transfer_encoding: list[bytes] = field(default_factory=list)
    close: bool = False
    # body_mode's answer for a request other than HEAD, once found: a cached head (HeadCache)
    # serves thousands of responses, and deriving it costs more than the rest of the framing.
    framing: tuple[BodyMode, int] | None = field(default=None, compare=False, repr=False)


_FIELD_LINES: Final = re.compile(rb"(?:\r\n[-!#$%&'*+.^_`|~0-9A-Za-z]+:[^\r\n]*+)*+")
# Fields the proxy handles itself or drops (RFC 9110 §7.6.1). Each is looked for with one
# bytes.find on the lower-cased head: cheaper than any per-line Python loop.
_SPECIAL: Final = tuple(b"\r\n" + n + b":" for n in (b"content-length", *sorted(HOP_BY_HOP)))


def parse_head(head: bytes) -> ResponseHead:
    """Parse and filter a response head (without the final CRLFCRLF); raise MalformedResponse."""
    if head.translate(None, _NOT_CTL):
        raise MalformedResponse("control character in the response head")
    n = head.count(b"\r\n")
    if head.count(b"\n") != n or head.count(b"\r") != n:
        raise MalformedResponse("bare CR or LF in the response head")
    eol = head.find(b"\r\n")
    out = _status_line(head if eol < 0 else head[:eol])
    if eol < 0:
        return out
    if _FIELD_LINES.fullmatch(head, eol) is None or (
        len(head) > _MAX_LINE and any(len(line) > _MAX_LINE for line in head.split(b"\r\n"))
    ):
        raise MalformedResponse("invalid header line")
    low = head.lower()
    cuts: list[tuple[int, int]] = []  # (start, end) of the fields not relayed, as CRLF + line
    nominated: list[bytes] = []
    for name in _SPECIAL:
        for at, end in _spans(low, name, eol):
            cuts.append((at, end))
            _special(out, name, head[at + len(name) : end], nominated)
    for name in nominated:  # rare: fields the upstream's Connection header nominates
        cuts.extend(_spans(low, name, eol))
    pieces, pos = [], eol
    for start, end in sorted(set(cuts)):
        pieces.append(head[pos:start])
        pos = end
    pieces.append(head[pos:])
    kept = b"".join(pieces)  # CRLF-prefixed lines
    out.lines = [kept[2:] + b"\r\n"] if kept else []
    return out


def _status_line(first: bytes) -> ResponseHead:
    version, code, sep = first[:9], first[9:12], first[12:13]
    if (
        version not in (b"HTTP/1.1 ", b"HTTP/1.0 ")
        or not code.isdigit()
        or code[:1] == b"0"
        or sep not in (b"", b" ")
    ):
        raise MalformedResponse("invalid status line")
    return ResponseHead(int(code), first[13:], version == b"HTTP/1.0 ")


def _spans(low: bytes, name: bytes, start: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each line of the field *name* (CRLF + lower-case name + colon)."""
    at = low.find(name, start)
    while at >= 0:
        end = low.find(b"\r\n", at + 2)
        end = len(low) if end < 0 else end
        yield at, end
        at = low.find(name, end)


def _special(out: ResponseHead, name: bytes, value: bytes, nominated: list[bytes]) -> None:
    """Record a framing or hop-by-hop field's value on *out* (it is not relayed)."""
    if name == b"\r\ncontent-length:":
        out.content_length.append(value.strip(b" \t"))
    elif name == b"\r\nconnection:":
        for token in value.lower().split(b","):
            token = token.strip(b" \t")
            if token == b"close":
                out.close = True
            elif token and token != b"keep-alive":
                nominated.append(b"\r\n" + token + b":")
    elif name == b"\r\ntransfer-encoding:":
        out.transfer_encoding.append(value)


class HeadCache:
    """Parsed response heads keyed by their exact bytes (bounded, oldest dropped first).

    An upstream sends the same head again and again (only Date changes, once a second), and
    parse_head is a pure function of its input, so a hit skips the validation and filtering.
    Entries are never mutated after parsing (but for the framing body_mode derives once).
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._heads: dict[bytes, ResponseHead] = {}

    def parse(self, head: bytes) -> ResponseHead:
        """parse_head(head), memoised."""
        hit = self._heads.get(head)
        if hit is not None:
            return hit
        parsed = parse_head(head)
        heads = self._heads
        if len(heads) >= self._size:
            del heads[next(iter(heads))]
        heads[head] = parsed
        return parsed


def body_mode(head: ResponseHead, is_head_request: bool) -> tuple[BodyMode, int]:
    """The response body's framing (RFC 9112 §6.3): (mode, length)."""
    if is_head_request:
        return NONE, 0
    framing = head.framing
    if framing is None:
        framing = head.framing = _body_mode(head)
    return framing


def _body_mode(head: ResponseHead) -> tuple[BodyMode, int]:
    if head.status in (204, 304) or head.status < 200:
        return NONE, 0
    if head.transfer_encoding:
        if head.content_length:
            raise MalformedResponse("both Content-Length and Transfer-Encoding")
        codings = [c.strip(b" \t").lower() for v in head.transfer_encoding for c in v.split(b",")]
        if codings != [b"chunked"]:
            raise MalformedResponse("unsupported transfer-encoding")
        return CHUNKED, 0
    if head.content_length:
        values = {v.strip(b" \t") for cl in head.content_length for v in cl.split(b",")}
        value = values.pop()
        if values or not value.isdigit() or len(value) > 18:
            raise MalformedResponse("invalid or conflicting Content-Length")
        return LENGTH, int(value)
    return UNTIL_CLOSE, 0


def client_head(
    head: ResponseHead, mode: BodyMode, length: int, http10: bool, close: bool
) -> tuple[bytes, bool, bool]:
    """The head the client gets: (bytes, body is chunk-encoded, connection closes after)."""
    chunked = False
    if mode == NONE:
        # HEAD and 304 keep the upstream's Content-Length (it describes the GET body).
        framing = (
            b"Content-Length: %s\r\n" % head.content_length[0]
            if head.content_length and head.status != 204
            else b""
        )
    elif mode == LENGTH:
        framing = b"Content-Length: %d\r\n" % length
    elif http10:
        framing, close = b"", True  # close-delimited for HTTP/1.0 clients
    else:
        framing, chunked = b"Transfer-Encoding: chunked\r\n", True
    conn = b"Connection: close\r\n" if close else (b"Connection: keep-alive\r\n" if http10 else b"")
    status = b"HTTP/1.1 %d %s\r\n" % (head.status, head.reason)
    return b"".join((status, *head.lines, framing, conn, b"\r\n")), chunked, close


def error_response(status: int, error: str, reason: str, is_head: bool, close: bool) -> bytes:
    """A complete short JSON error response."""
    body = json.dumps({"error": error, "reason": reason}).encode()
    return b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status,
        REASONS.get(status, b"Error"),
        len(body),
        b"Connection: close\r\n" if close else b"",
        b"" if is_head else body,
    )
