"""PURE. The HTTP/1.1 upstream's response head, re-framed for an HTTP/2 client (RFC 9113 8.2-8.3).

http1.response.parse_head has validated the head and removed every connection-specific field
(Connection and what it names, Keep-Alive, Transfer-Encoding, Upgrade, TE, Trailer...) and the
Content-Length, so what is left is end-to-end. This module only changes the form.

Rules:
1. Names are lower-cased; values lose the optional whitespace around them (8.2.1 forbids it).
2. The length is the proxy's own: `content-length` from the framing body_mode found (as in
   HTTP/1.1, HEAD and 304 keep the upstream's value, which describes the GET body; 204 and 1xx
   have none). A chunked or close-delimited body has no length: HTTP/2 frames it with
   END_STREAM.
3. The reason phrase is dropped: HTTP/2 has none.
4. The other way (h1_head: an h2c upstream's HEADERS for an HTTP/1.1 client): pseudo-headers and
   connection-specific fields never become lines; a value with CR, LF or NUL, a :status that is
   not three digits, or a content-length that is not one number is a malformed response (502);
   the framing is the one HTTP/1.1 would give: none for HEAD, 1xx, 204 and 304, the upstream's
   content-length, else chunked.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Final

from mtls_proxy.core.headers import HOP_BY_HOP
from mtls_proxy.http1.response import (
    CHUNKED,
    LENGTH,
    NONE,
    BodyMode,
    MalformedResponse,
    ResponseHead,
)

_BAD_VALUE: Final = re.compile(rb"[\x00\r\n]")
_DROP: Final = HOP_BY_HOP | {b"content-length"}


def h2_headers(head: ResponseHead, mode: BodyMode, length: int) -> list[tuple[bytes, bytes]]:
    """The HEADERS block an HTTP/2 client gets for *head* framed as (*mode*, *length*)."""
    out = [(b":status", b"%d" % head.status)]
    # head.lines are runs of wire lines (the kept spans between removed fields), CRLF-ended.
    for line in b"".join(head.lines).split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        out.append((name.lower(), value.strip(b" \t")))
    if mode == LENGTH:
        out.append((b"content-length", b"%d" % length))
    elif mode == NONE and head.content_length and head.status != 204 and head.status >= 200:
        out.append((b"content-length", head.content_length[0].strip(b" \t")))
    return out


def error_headers(status: int, body_length: int) -> list[tuple[bytes, bytes]]:
    """The HEADERS block of one of the proxy's own JSON error answers."""
    return [
        (b":status", b"%d" % status),
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % body_length),
    ]


def h1_head(
    headers: list[tuple[bytes, bytes]], is_head: bool
) -> tuple[ResponseHead, BodyMode, int]:
    """An h2c upstream's response HEADERS as an HTTP/1.1 head and its framing (rule 4)."""
    status = b""
    lines: list[bytes] = []
    lengths: list[bytes] = []
    for name, value in headers:
        if _BAD_VALUE.search(value) or _BAD_VALUE.search(name):
            raise MalformedResponse("control byte in a response field")
        if name == b":status":
            status = value
        elif name == b"content-length":
            lengths.append(value)
        elif name[:1] != b":" and name not in _DROP:
            lines.append(b"%s: %s\r\n" % (name, value))
    if len(status) != 3 or not status.isdigit():
        raise MalformedResponse("invalid :status")
    code = int(status)
    if len(set(lengths)) > 1 or (lengths and not lengths[0].isdigit()):
        raise MalformedResponse("invalid content-length")
    head = ResponseHead(code, _reason(code), False, lines, lengths[:1])
    if is_head or code < 200 or code in (204, 304):
        return head, NONE, 0
    if lengths:
        return head, LENGTH, int(lengths[0])
    return head, CHUNKED, 0


def _reason(code: int) -> bytes:
    """A reason phrase for the HTTP/1.1 status line (HTTP/2 carries none)."""
    try:
        return HTTPStatus(code).phrase.encode()
    except ValueError:
        return b""
