"""PURE. An HTTP/2 request's header block, checked (RFC 9113 8.2-8.3) and turned into what
http1.request.prepare validates and re-serializes for an HTTP/1.1 upstream.

The h2 library already refuses much of this; the rules are ours all the same, because the
identity headers' trust rests on them and a library's validation is a setting someone can turn
off. Everything after this step is the HTTP/1.1 path (prepare: stripping, identity, Host rules),
so both protocols share one set of header rules.

Rules:
1. Names are lower-case tokens; values carry no NUL, CR or LF and no leading or trailing space or
   tab (8.2.1). An upper-case name is malformed, not folded.
2. Pseudo-headers: only :method, :scheme, :path and :authority, each at most once, all before
   the regular fields; :method, :scheme and :path are required, :path is origin-form (or `*`
   for OPTIONS); :scheme is https or http; CONNECT (the only form without :path) is refused.
3. Connection-specific fields are malformed (8.2.2): Connection, Proxy-Connection, Keep-Alive,
   Transfer-Encoding, Upgrade; TE only as `trailers`.
4. :authority and Host, when both are sent, must be equal (8.3.1: a proxy must not let the two
   disagree); the upstream gets one Host, from :authority if there is one.
5. Cookie fields split across lines are joined with "; " (8.2.3) for the HTTP/1.1 upstream.
6. A body whose length the request does not declare (no content-length, END_STREAM not on the
   headers) goes to an HTTP/1.1 upstream chunked; the proxy writes that framing, never a client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from mtls_proxy.core.errors import BadRequest, MethodNotAllowed

_PSEUDO: Final = frozenset({b":method", b":scheme", b":path", b":authority"})
_CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"}
)
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE: Final = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")


class MalformedH2Request(BadRequest):
    """A header block RFC 9113 calls malformed (a stream error; answered 400 here)."""

    public_message = "malformed HTTP/2 request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail  # for the log: which rule, never a value


@dataclass(slots=True)
class H2Request:
    """A checked HTTP/2 request head, in the terms http1.request.prepare takes."""

    method: bytes
    path: bytes
    scheme: bytes
    raw: list[tuple[bytes, bytes]] = field(default_factory=list)  # Host first, then the rest
    content_type: bytes | None = None
    te_trailers: bool = False  # the client accepts trailers (gRPC requires it)


def translate(headers: list[tuple[bytes, bytes]], end_stream: bool) -> H2Request:
    """Check *headers* (one decoded HEADERS block, in order) and translate them (rules 1-6);
    *end_stream*: the block ended the stream (no body follows)."""
    pseudo: dict[bytes, bytes] = {}
    raw: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    host: bytes | None = None
    length = te = False
    content_type: bytes | None = None
    for name, value in headers:
        if _BAD_VALUE.search(value):
            raise MalformedH2Request("invalid field value")
        if name[:1] == b":":
            if raw or cookies or host is not None or length or te or content_type is not None:
                raise MalformedH2Request("pseudo-header after a regular field")
            if name not in _PSEUDO:
                raise MalformedH2Request("unknown or response pseudo-header")
            if name in pseudo:
                raise MalformedH2Request("repeated pseudo-header")
            pseudo[name] = value
            continue
        if not _TOKEN.fullmatch(name):
            raise MalformedH2Request("field name not a lower-case token")
        if name in _CONNECTION_SPECIFIC:
            raise MalformedH2Request("connection-specific field")
        if name == b"te":
            if value != b"trailers":
                raise MalformedH2Request("te other than trailers")
            te = True
            continue  # hop-by-hop: an HTTP/2 upstream gets it from the adapter, HTTP/1.1 never
        if name == b"host":
            if host is not None:
                raise MalformedH2Request("repeated host")
            host = value
            continue
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"content-length":
            length = True
        elif name == b"content-type":
            content_type = value
        raw.append((name, value))
    method, path, scheme, authority = _target(pseudo, host)
    head: list[tuple[bytes, bytes]] = [(b"host", authority)]
    if cookies:
        head.append((b"cookie", b"; ".join(cookies)))
    raw[:0] = head
    if not end_stream and not length:
        raw.append((b"transfer-encoding", b"chunked"))  # rule 6
    return H2Request(method, path, scheme, raw, content_type, te)


def _target(pseudo: dict[bytes, bytes], host: bytes | None) -> tuple[bytes, bytes, bytes, bytes]:
    """(method, path, scheme, authority) from the pseudo-headers and Host (rules 2 and 4)."""
    method = pseudo.get(b":method")
    if method == b"CONNECT":
        raise MethodNotAllowed()
    path, scheme = pseudo.get(b":path"), pseudo.get(b":scheme")
    if method is None or path is None or scheme is None:
        raise MalformedH2Request("missing :method, :scheme or :path")
    if scheme not in (b"https", b"http"):
        raise MalformedH2Request("unsupported :scheme")
    if not (path.startswith(b"/") or (path == b"*" and method == b"OPTIONS")):
        raise MalformedH2Request(":path not in origin form")
    authority = pseudo.get(b":authority")
    if authority is not None and host is not None and authority != host:
        raise MalformedH2Request(":authority and host differ")
    authority = authority if authority is not None else host
    if authority is None or not authority:
        raise MalformedH2Request("no :authority or host")
    return method, path, scheme, authority
