"""PURE. HTTP/1.1 response heads: strict parsing of the upstream's, re-framing for the client.

Rules:
1. The upstream's head is validated as a whole (no control bytes, no bare CR or LF, token field
   names, a valid status line); anything else is a 502 (SECURITY.md UPS-003/004/012).
2. Hop-by-hop fields and the fields the upstream's ``Connection`` nominates never reach the client;
   framing (Content-Length / Transfer-Encoding) is always the proxy's own (UPS-013, HDR-023).
3. Ambiguous framing (CL with TE, conflicting CLs, codings other than chunked) is a 502 (UPS-001/2).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Final

from mtls_proxy.headers import HOP_BY_HOP, normalize_name

NONE: Final = 0  # no body: HEAD, 1xx, 204, 304
LENGTH: Final = 1
CHUNKED: Final = 2
UNTIL_CLOSE: Final = 3

_STATUS: Final = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: (.*))?", re.DOTALL)
_CTL: Final = bytes([*range(0, 9), *range(10, 32), 127])
_NOT_CTL: Final = bytes(b for b in range(256) if b not in _CTL or b in (10, 13))
_TOKEN: Final = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_MAX_LINE: Final = 8192
REASONS: Final = {
    400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 405: b"Method Not Allowed",
    408: b"Request Timeout", 417: b"Expectation Failed", 431: b"Request Header Fields Too Large",
    501: b"Not Implemented", 502: b"Bad Gateway", 504: b"Gateway Timeout",
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


def parse_head(head: bytes) -> ResponseHead:
    """Parse and filter a response head (without the final CRLFCRLF); raise MalformedResponse."""
    if head.translate(None, _NOT_CTL):
        raise MalformedResponse("control character in the response head")
    lines = head.split(b"\r\n")
    if head.count(b"\n") != len(lines) - 1 or head.count(b"\r") != len(lines) - 1:
        raise MalformedResponse("bare CR or LF in the response head")
    m = _STATUS.fullmatch(lines[0])
    if m is None:
        raise MalformedResponse("invalid status line")
    out = ResponseHead(int(m.group(2)), m.group(3) or b"", m.group(1) == b"0")
    kept: list[tuple[bytes, bytes]] = []
    nominated: set[bytes] = set()
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, _TOKEN) or len(line) > _MAX_LINE:
            raise MalformedResponse("invalid header line")
        lname = normalize_name(name)
        if lname == b"content-length":
            out.content_length.append(value.strip(b" \t"))
        elif lname == b"transfer-encoding":
            out.transfer_encoding.append(value)
        elif lname == b"connection":
            for token in value.split(b","):
                token = normalize_name(token.strip(b" \t"))
                if token == b"close":
                    out.close = True
                elif token:
                    nominated.add(token)
        elif lname not in HOP_BY_HOP:
            kept.append((lname, line + b"\r\n"))
    out.lines = [line for lname, line in kept if lname not in nominated] if nominated else [
        line for _, line in kept
    ]
    return out


def body_mode(head: ResponseHead, is_head_request: bool) -> tuple[int, int]:
    """The response body's framing (RFC 9112 §6.3): (mode, length)."""
    if is_head_request or head.status in (204, 304) or head.status < 200:
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


def client_head(head: ResponseHead, mode: int, length: int, http10: bool, close: bool
                ) -> tuple[bytes, bool, bool]:
    """The head the client gets: (bytes, body is chunk-encoded, connection closes after)."""
    chunked = False
    if mode == NONE:
        # HEAD and 304 keep the upstream's Content-Length (it describes the GET body).
        framing = (b"Content-Length: %s\r\n" % head.content_length[0]
                   if head.content_length and head.status != 204 else b"")
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
        status, REASONS.get(status, b"Error"), len(body),
        b"Connection: close\r\n" if close else b"", b"" if is_head else body)
