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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtls_proxy.http1.response import LENGTH, NONE

if TYPE_CHECKING:
    from mtls_proxy.http1.response import BodyMode, ResponseHead


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
