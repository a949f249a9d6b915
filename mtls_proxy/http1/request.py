"""PURE. Validate a parsed request head and serialize the one the upstream gets.

Rules:
1. Reject ambiguity at the edge (docs/security.md): only HTTP/1.0 and 1.1; exactly one valid Host
   on HTTP/1.1; ``Transfer-Encoding`` must be exactly ``chunked`` (and never on HTTP/1.0);
   ``Expect`` only ``100-continue``; no CONNECT; origin-form, ``*`` for OPTIONS, or absolute-form
   (reduced to origin-form, its scheme never trusted).
2. Re-serialize, never splice: the upstream head is built from validated parts, with the proxy's
   own framing, forwarding headers and the connection's identity block appended last.
3. Every forwarded request carries exactly one ``X-Request-Id``: the client's if it sent one
   valid value (headers.py) that its ``Connection`` header does not name, else the one the
   caller made; it is also the access record's.
4. W3C trace context (tracecontext.py): a client's valid traceparent and its tracestate are
   forwarded, or the context *make* gives the request (the proxy's span); anything else of
   theirs is dropped. The proxy's lines go with its forwarding fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtls_proxy.core.errors import (
    BadRequest,
    ExpectationFailed,
    MethodNotAllowed,
    NotImplementedCoding,
    VersionNotSupported,
)
from mtls_proxy.core.headers import (
    IdentityBlock,
    RequestHeaders,
    UnderscoreAction,
    split_request_headers,
)
from mtls_proxy.core.paths import AmbiguousPath, normalize_target
from mtls_proxy.core.tracecontext import ChildFactory, TraceMode, TraceParent, upstream_fields
from mtls_proxy.http1.websocket import UPGRADE_LINES, websocket_key


class UnderscoreHeader(BadRequest):
    """A header name with '_' under ``--underscore-headers reject`` (Envoy's REJECT_REQUEST)."""

    public_message = "header names with '_' are not accepted"


class AmbiguousTarget(BadRequest):
    """A path that servers resolve differently (paths.py rule 3): refused, never guessed."""

    public_message = "ambiguous request path"


class UpgradeWithBody(NotImplementedCoding):
    """An Upgrade request with a body: its body could not be framed."""

    public_message = "protocol upgrades are not supported"


@dataclass(slots=True)
class Prepared:
    """A validated request: what the proxy needs to route it, and the upstream head."""

    path: bytes
    head: bytes
    chunked: bool = False
    has_body: bool = False
    expect: bool = False
    ws_key: bytes | None = None  # a WebSocket upgrade the proxy will tunnel after a valid 101
    length: int = 0  # the Content-Length the parser frames the body with (not chunked)
    underscored: list[bytes] | None = None  # names with '_' that were not forwarded
    request_id: bytes = b""  # as forwarded in X-Request-Id (rule 3)
    trace: TraceParent | None = None  # as forwarded in traceparent (rule 4)
    span: object = None  # what the ChildFactory returned with it (the proxy's span)


_PORT_LINES: dict[bytes, bytes] = {b"": b"\r\n"}


def _port_line(port: bytes) -> bytes:
    """The end of the X-Forwarded-Host line and the X-Forwarded-Port line (none for a unix
    listener); memoised, as a listener has one port."""
    line = _PORT_LINES.get(port)
    if line is None:
        line = b"\r\nX-Forwarded-Port: %s\r\n" % port
        if len(_PORT_LINES) < 64:
            _PORT_LINES[port] = line
    return line


def origin_form(method: bytes, url: bytes) -> bytes:
    """The request-target to forward (rule 1); raise BadRequest for other forms."""
    target = url
    if target[:1] != b"/":
        if target == b"*" and method == b"OPTIONS":
            return target
        lower = target[:8].lower()
        if not (lower.startswith((b"http://", b"https://"))):
            raise BadRequest
        start = target.find(b"//") + 2
        slash = target.find(b"/", start)
        if slash == start or start == len(target):
            raise BadRequest  # "http:///x": no authority (docs/security.md, SMG-038)
        target = target[slash:] if slash > 0 else b"/"
    hash_at = target.find(b"#")
    return target[:hash_at] if hash_at >= 0 else target  # a fragment is not part of the target


def prepare(
    method: bytes,
    url: bytes,
    version: str,
    raw: list[tuple[bytes, bytes]],
    *,
    upgrade: bool,
    client_ip: bytes,
    block: IdentityBlock,
    default_host: bytes,
    normalize: bool = False,
    port: bytes = b"",
    underscores: UnderscoreAction = "drop",
    request_id: bytes = b"-",
    trace: TraceMode = "forward",
    make: ChildFactory | None = None,
) -> Prepared:
    """Validate one request head and build the upstream head; raise a ProxyError to refuse.

    *request_id* is forwarded unless the client sent a valid X-Request-Id (rule 3); *trace*
    and *make* decide the trace context (rule 4).

    *normalize* (the policy has routes): the path is normalized and forwarded as normalized,
    so that the route decided on is the path the upstream serves (paths.py).
    """
    if version not in ("1.0", "1.1"):
        raise VersionNotSupported
    if method == b"CONNECT":
        raise MethodNotAllowed
    http10 = version == "1.0"
    target = origin_form(method, url)
    if normalize:
        try:
            target = normalize_target(target)
        except AmbiguousPath:
            raise AmbiguousTarget from None
    rh = split_request_headers(raw, underscores)
    if rh.underscored and underscores == "reject":
        raise UnderscoreHeader
    # Exactly one Host (rule 1): required on HTTP/1.1, never two, never a list.
    if len(rh.hosts) > 1 or (not rh.hosts and not http10):
        raise BadRequest
    host = rh.hosts[0] if rh.hosts else default_host
    if not host or b"," in host or b" " in host or b"\t" in host:
        raise BadRequest
    out = Prepared(target, b"", underscored=rh.underscored, request_id=rh.request_id or request_id)
    framing = _framing(rh, http10, out)
    if upgrade and out.has_body:
        # llhttp hands everything after an upgrade request's head to the new protocol, so its
        # body can't be framed; upgrades without a body go upstream as plain requests, except
        # a valid WebSocket upgrade, which is forwarded as one (websocket.py).
        raise UpgradeWithBody
    if upgrade:
        out.ws_key = websocket_key(method, http10, out.has_body, rh)
        if out.ws_key is not None:
            framing = UPGRADE_LINES
    trace_lines = b""
    if rh.traceparent is not None or make is not None:  # else nothing to forward or make
        trace_lines, out.trace, out.span = upstream_fields(
            trace, rh.traceparent, rh.tracestate, make
        )
    out.head = _upstream_head(
        method, target, host, rh, client_ip, port, out.request_id, trace_lines, block, framing
    )
    return out


def _upstream_head(
    method: bytes,
    target: bytes,
    host: bytes,
    rh: RequestHeaders,
    client_ip: bytes,
    port: bytes,
    request_id: bytes,
    trace_lines: bytes,
    block: IdentityBlock,
    framing: bytes,
) -> bytes:
    """The upstream's head (rule 2): the client's end-to-end fields, then the proxy's
    forwarding fields, request id, trace context (rule 4) and identity block, appended last,
    and its framing."""
    return b"".join(
        (
            method,
            b" ",
            target,
            b" HTTP/1.1\r\nHost: ",
            host,
            b"\r\n",
            rh.forwarded_lines(),
            b"X-Forwarded-For: ",
            client_ip,
            b"\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: ",
            host,
            _port_line(port),
            b"X-Request-Id: ",
            request_id,
            b"\r\n",
            trace_lines,
            block.lines,
            block.xfcc_line(rh.xfcc),
            framing,
            b"\r\n",
        )
    )


def _framing(rh: RequestHeaders, http10: bool, out: Prepared) -> bytes:
    """The body framing the upstream gets (the proxy's own, rule 2), and Expect (rule 1);
    sets *out*'s chunked, has_body, length and expect."""
    framing = b""
    if rh.transfer_encoding:
        if http10:
            raise BadRequest  # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 is faulty framing
        if b",".join(rh.transfer_encoding).strip(b" \t").lower() != b"chunked":
            raise NotImplementedCoding
        out.chunked = out.has_body = True
        framing = b"Transfer-Encoding: chunked\r\n"
    elif rh.content_length is not None:
        # The exact name only (headers.py rule 2), the one llhttp frames the body with; it has
        # validated the digits and refused duplicates.
        out.length = length = int(rh.content_length)
        out.has_body = length > 0
        framing = b"Content-Length: %d\r\n" % length
    if rh.expect:
        if b",".join(rh.expect).strip(b" \t").lower() != b"100-continue":
            raise ExpectationFailed
        out.expect = not http10
    return framing
