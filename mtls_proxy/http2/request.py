"""PURE. An HTTP/2 request's header block, checked (RFC 9113 8.2-8.3) and turned into what
http1.request.prepare validates and re-serializes for an HTTP/1.1 upstream.

The h2 library already refuses much of this; the rules are ours all the same, because the
identity headers' trust rests on them and a library's validation is a setting someone can turn
off. Everything after this step is the HTTP/1.1 path (prepare: stripping, identity, Host rules),
so both protocols share one set of header rules.

Rules:
1. Names are lower-case tokens; values carry no control byte but HTAB (8.2.1 forbids NUL, CR
   and LF; the rest are what llhttp refuses over HTTP/1.1, so both protocols pass the same
   bytes) and no leading or trailing space or tab. An upper-case name is malformed, not folded.
2. Pseudo-headers: only :method, :scheme, :path and :authority, each at most once, all before
   the regular fields; :method, :scheme and :path are required. :method is a token without
   lower-case letters (as llhttp takes them over HTTP/1.1: a route's `methods` compare exactly,
   and an upstream that folds case would run `delete` as DELETE past a DELETE rule), :path is
   origin-form (or `*` for OPTIONS) of visible ASCII without '#': an HTTP/2 :path reaches an
   HTTP/1.1 request line, where a space or a control byte would split it differently at a
   lenient upstream than at the route match. :scheme is https or http; CONNECT (the only form
   without :path) is refused.
3. Connection-specific fields are malformed (8.2.2): Connection, Proxy-Connection, Keep-Alive,
   Transfer-Encoding, Upgrade; TE only as `trailers`.
4. :authority (and Host) is host[:port]: a reg-name, an IPv4 address or an [IPv6] literal, no
   userinfo (8.3.1). When both are sent they must name the same host (case-insensitively): the
   upstream gets one Host, from :authority if there is one.
7. Content-Length is 1*DIGIT (at most 18), repeated only with the same value and forwarded
   once; a non-zero length on a header block that ends the stream is malformed (8.1.1: the
   body it announces never comes, and an HTTP/1.1 upstream would read the next request as it).
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
_METHOD: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Z]+")  # no lower case: see rule 2
_BAD_VALUE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]|^[ \t]|[ \t]$")
_PATH: Final = re.compile(rb"/[\x21-\x22\x24-\x7e]*")
_AUTHORITY: Final = re.compile(
    rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=%]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?"
)
_LENGTH: Final = re.compile(rb"[0-9]{1,18}")


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
    length: int | None = None
    te = False
    content_type: bytes | None = None
    for name, value in headers:
        if _BAD_VALUE.search(value):
            raise MalformedH2Request("invalid field value")
        if name[:1] == b":":
            if raw or cookies or host is not None or te:
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
            if value.lower() != b"trailers":
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
            if not _LENGTH.fullmatch(value):
                raise MalformedH2Request("content-length not a number")
            if length is not None:
                if int(value) != length:
                    raise MalformedH2Request("differing content-length")
                continue  # rule 7: forwarded once
            length = int(value)
        elif name == b"content-type":
            content_type = value
        raw.append((name, value))
    method, path, scheme, authority = _target(pseudo, host)
    head: list[tuple[bytes, bytes]] = [(b"host", authority)]
    if cookies:
        head.append((b"cookie", b"; ".join(cookies)))
    raw[:0] = head
    if end_stream and length:
        raise MalformedH2Request("content-length with no body")  # rule 7
    if not end_stream and length is None:
        raw.append((b"transfer-encoding", b"chunked"))  # rule 6
    return H2Request(method, path, scheme, raw, content_type, te)


def _target(pseudo: dict[bytes, bytes], host: bytes | None) -> tuple[bytes, bytes, bytes, bytes]:
    """(method, path, scheme, authority) from the pseudo-headers and Host (rules 2 and 4)."""
    method = pseudo.get(b":method")
    if method is not None and not _METHOD.fullmatch(method):
        raise MalformedH2Request(":method not a token")
    if method == b"CONNECT":
        raise MethodNotAllowed()
    path, scheme = pseudo.get(b":path"), pseudo.get(b":scheme")
    if method is None or path is None or scheme is None:
        raise MalformedH2Request("missing :method, :scheme or :path")
    if scheme not in (b"https", b"http"):
        raise MalformedH2Request("unsupported :scheme")
    if not (_PATH.fullmatch(path) or (path == b"*" and method == b"OPTIONS")):
        raise MalformedH2Request(":path not in origin form")
    authority = pseudo.get(b":authority")
    for value in (authority, host):
        if value is not None and not _AUTHORITY.fullmatch(value):
            raise MalformedH2Request(":authority or host not host[:port]")
    if authority is not None and host is not None and authority.lower() != host.lower():
        raise MalformedH2Request(":authority and host differ")
    authority = authority if authority is not None else host
    if authority is None:
        raise MalformedH2Request("no :authority or host")
    return method, path, scheme, authority
