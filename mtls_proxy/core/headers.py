"""PURE. Request/response header rewriting and the identity header encoders.

Rules:
1. Strip first, inject last (Apache CVE-2022-31813, Go CVE-2021-33197): the client's hop-by-hop
   headers, every header its ``Connection`` header nominates, and every identity-header name of
   every dialect are removed before the proxy adds its own.
2. For *stripping*, names compare case-insensitively with ``_`` and ``-`` treated alike, because
   CGI/WSGI-style upstreams map both to the same ``HTTP_X_...`` key (docs/security.md, HDR-004). For
   *interpreting*, only the exact name counts: an underscore spelling of a framing, hop-by-hop,
   forwarding or identity field is a look-alike, dropped and never read (INT-001). Other
   names with ``_`` follow ``--underscore-headers`` (drop by default, as nginx).
3. Framing is always the proxy's own: client ``Content-Length``/``Transfer-Encoding`` are never
   copied; the caller writes fresh framing from the parser's decision. ``Connection`` cannot
   nominate Host or framing fields.
4. Every injected value is printable ASCII: no CR, LF, NUL or other control byte can reach a header,
   whatever the certificate holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Literal

from mtls_proxy.core import dialects as dialects_mod
from mtls_proxy.core.identity import PeerIdentity

XfccMode = Literal["sanitize_set", "append_forward", "forward_only", "sanitize"]
DIALECTS: Final[tuple[str, ...]] = ("xfcc", "simple", "rfc9440", "tomcat", "traefik")
XFCC_MODES: Final[tuple[str, ...]] = ("sanitize_set", "append_forward", "forward_only", "sanitize")

XFCC: Final = b"x-forwarded-client-cert"
# Every identity-header name of every dialect, normalised (lower case, '-').
IDENTITY_NAMES: Final[frozenset[bytes]] = frozenset(
    {
        XFCC,
        b"x-client-subject",
        b"x-client-cert-sha256",
        b"x-client-spiffe-id",
        b"x-client-dns",
        b"x-client-verified",
        b"x-client-uri",
        b"client-cert",
        b"client-cert-chain",
        b"ssl-client-cert",
        b"ssl-client-escaped-cert",
        b"ssl-cipher",
        b"ssl-session-id",
        b"ssl-cipher-usekeysize",
        b"x-forwarded-tls-client-cert",
        b"x-forwarded-tls-client-cert-info",
    }
)
# RFC 9110 §7.6.1 hop-by-hop fields, plus the legacy ones proxies still see.
HOP_BY_HOP: Final[frozenset[bytes]] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
# Set by the proxy from the connection; a client's value never reaches the upstream.
PROXY_SET: Final[frozenset[bytes]] = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip"}
)
# Forwarding families that frameworks act on (Spring's ForwardedHeaderFilter reads -Prefix and
# -Port, IIS/Symfony read X-Original-URL and X-Rewrite-URL, forward-auth services -Uri and
# -Method): every member is removed, whatever the suffix.
#
# Also removed (INT-034): the client-certificate headers of other terminators (nginx's
# X-SSL-Client-*, Apache's SSL_CLIENT_*, IIS ARR, AWS ALB, Envoy's internal x-envoy-*), client
# address headers that apps allow-list on, and method overrides (Jersey, ASP.NET, Express act on
# X-HTTP-Method-Override: a route checked as GET would run as DELETE). An upstream once placed
# behind another proxy may still trust them; the proxy never sets them, so no client may either.
FORWARDING_PREFIXES: Final[tuple[bytes, ...]] = (
    b"x-forwarded-",
    b"x-original-",
    b"x-envoy-",
    b"x-ssl-client-",
    b"ssl-client-",
    b"x-amzn-mtls-",
)
FORWARDING_NAMES: Final[frozenset[bytes]] = PROXY_SET | {
    b"x-rewrite-url",
    b"x-forwarded",
    b"x-client-ip",
    b"x-cluster-client-ip",
    b"true-client-ip",
    b"x-proxyuser-ip",
    b"cf-connecting-ip",
    b"x-http-method-override",
    b"x-http-method",
    b"x-method-override",
    b"x-client-cert",
    b"x-client-cert-chain",
    b"x-client-dn",
    b"x-client-s-dn",
    b"x-client-i-dn",
    b"x-client-issuer",
    b"x-client-email",
    b"x-client-verify",
    b"x-client-serial",
    b"x-client-fingerprint",
    b"x-arr-clientcert",
}
# Connection may not nominate these (HDR-008): ignoring the nomination keeps framing intact.
_UNNOMINABLE: Final[frozenset[bytes]] = frozenset(
    {b"host", b"content-length", b"transfer-encoding"}
)
UnderscoreAction = Literal["drop", "reject", "allow"]
UNDERSCORE_ACTIONS: Final[tuple[str, ...]] = ("drop", "reject", "allow")

# What a header name is to the proxy (rule 2, rule 3). Only an exact spelling (any case) of a
# framing or control field is *interpreted*; a spelling that merely folds to a protected name
# ("Content_Length") is a look-alike: never interpreted, never forwarded (llhttp frames the body
# by the exact name, so acting on the look-alike would make two readings of one request).
KEEP, DROP, HOST, CONNECTION, LENGTH, CODING, EXPECT, XFCC_IN, UPGRADE = range(9)
UNDERSCORE, LOOKALIKE, REQUEST_ID, TRACEPARENT, TRACESTATE = 9, 10, 11, 12, 13
_EXACT: Final[dict[bytes, int]] = {
    b"host": HOST,
    b"connection": CONNECTION,
    b"content-length": LENGTH,
    b"transfer-encoding": CODING,
    b"expect": EXPECT,
    XFCC: XFCC_IN,
    b"upgrade": UPGRADE,
    b"x-request-id": REQUEST_ID,  # the proxy forwards its own (request.py)
    b"traceparent": TRACEPARENT,  # forwarded when valid (tracecontext.py)
    b"tracestate": TRACESTATE,
}
# A client's X-Request-Id is honoured only in this shape, once the whitespace around it is
# trimmed (else the proxy makes one): it goes to the upstream and the access log verbatim.
_REQUEST_ID: Final = re.compile(rb"[A-Za-z0-9._-]{1,128}")
_PROTECTED: Final[frozenset[bytes]] = IDENTITY_NAMES | HOP_BY_HOP | FORWARDING_NAMES | set(_EXACT)


def protected(lname: bytes) -> bool:
    """A framing, hop-by-hop, forwarding or identity field (*lname* folded by normalize_name):
    a client's copy never reaches the upstream under this name."""
    return lname in _PROTECTED or lname.startswith(FORWARDING_PREFIXES)


@dataclass(slots=True)
class RequestHeaders:
    """What the proxy learnt from a client's header block, and the lines it will forward."""

    kept: list[tuple[bytes, bytes, bytes]] = field(default_factory=list)  # (lname, name, value)
    hosts: list[bytes] = field(default_factory=list)
    content_length: bytes | None = None
    transfer_encoding: list[bytes] = field(default_factory=list)
    expect: list[bytes] = field(default_factory=list)
    xfcc: list[bytes] = field(default_factory=list)
    upgrade: bool = False
    upgrade_values: list[bytes] = field(default_factory=list)
    connection_tokens: set[bytes] = field(default_factory=set)
    underscored: list[bytes] | None = None  # names with '_' not forwarded (rarely any)
    request_id: bytes | None = None  # the client's X-Request-Id if there is exactly one, valid
    traceparent: bytes | None = None  # the client's if it sent one line of it; b"" for several
    tracestate: list[bytes] | None = None

    def forwarded_lines(self) -> bytes:
        """The kept headers as wire lines, with Connection-nominated ones removed."""
        return b"".join(b"%s: %s\r\n" % (name, value) for _, name, value in self.kept)


NAME_CACHE: dict[bytes, tuple[bytes, int]] = {}
NAME_CACHE_MAX: Final = 4096


def normalize_name(name: bytes) -> bytes:
    """Lower case with '_' mapped to '-' (rule 2)."""
    return classify(name)[0]


def classify(name: bytes) -> tuple[bytes, int]:
    """(folded name, kind) for a client header name; memoised, as the same few names recur."""
    hit = NAME_CACHE.get(name)
    if hit is not None:
        return hit
    lower = name.lower()
    lname = lower.replace(b"_", b"-")
    if lname != lower:  # an underscore spelling: never a field the proxy interprets
        kind = LOOKALIKE if protected(lname) else UNDERSCORE
    elif lname in _EXACT:
        kind = _EXACT[lname]
    else:
        kind = DROP if protected(lname) else KEEP
    hit = (lname, kind)
    if len(NAME_CACHE) < NAME_CACHE_MAX:  # bounded: a client can't grow it without limit
        NAME_CACHE[name] = hit
    return hit


def split_request_headers(
    raw: list[tuple[bytes, bytes]], underscores: UnderscoreAction = "drop"
) -> RequestHeaders:
    """Sort a client's headers into kept lines and the fields the proxy handles itself.

    Names with '_' follow *underscores* (nginx drops them, Envoy can drop or reject), except
    look-alikes of protected names, which are dropped whatever it says; both are reported in
    ``underscored`` (the caller counts, logs, or with ``reject`` refuses them)."""
    out = RequestHeaders()
    nominated: set[bytes] = set()
    kept = out.kept
    names = NAME_CACHE
    for name, value in raw:
        lname, kind = names.get(name) or classify(name)
        if kind == KEEP:
            kept.append((lname, name, value))
        elif kind == DROP:
            continue
        elif kind == HOST:
            out.hosts.append(value)
        elif kind == CONNECTION:
            for token in value.split(b","):
                token = normalize_name(token.strip())
                out.connection_tokens.add(token)
                if token and token not in _UNNOMINABLE:
                    nominated.add(token)
        elif kind == LENGTH:
            out.content_length = value
        elif kind == CODING:
            out.transfer_encoding.append(value)
        elif kind == EXPECT:
            out.expect.append(value)
        elif kind == XFCC_IN:
            out.xfcc.append(value)
        elif kind == UPGRADE:
            out.upgrade = True
            out.upgrade_values.append(value)
        elif kind == REQUEST_ID:
            # Two copies: neither is honoured (b"" is never valid).
            out.request_id = b"" if out.request_id is not None else value
        elif kind == TRACEPARENT:
            out.traceparent = b"" if out.traceparent is not None else value  # b"": invalid
        elif kind == TRACESTATE:
            if out.tracestate is None:
                out.tracestate = [value]
            else:
                out.tracestate.append(value)
        elif kind == UNDERSCORE and underscores == "allow":
            kept.append((lname, name, value))
        elif out.underscored is None:  # LOOKALIKE, or UNDERSCORE under drop/reject
            out.underscored = [name]
        else:
            out.underscored.append(name)
    if nominated:
        out.kept = [h for h in kept if h[0] not in nominated]
        _nominated(out, nominated)
    rid = out.request_id
    if rid is not None and _REQUEST_ID.fullmatch(rid) is None:
        # RFC 9110 section 5.5: whitespace around a field value is not part of it (llhttp drops
        # only the leading). Trimmed here, when the value fails as it came: the common case
        # pays nothing.
        rid = rid.strip(b" \t")
        out.request_id = rid if _REQUEST_ID.fullmatch(rid) is not None else None
    return out


def _nominated(out: RequestHeaders, nominated: set[bytes]) -> None:
    """The fields the proxy handles itself that the client's Connection names: hop-by-hop by
    the client's own declaration (rule 1), meant for this hop and not for the upstream."""
    if b"x-request-id" in nominated:
        out.request_id = None  # not the request's id for the upstream: the proxy makes one
    if b"tracestate" in nominated:
        out.tracestate = None
    if b"traceparent" in nominated:
        out.traceparent = out.tracestate = None  # and a tracestate goes with it


def clean(value: str) -> str:
    """Escape every byte outside printable ASCII as \\XX (rule 4)."""
    if value.isascii() and value.isprintable():
        return value
    raw = value.encode("utf-8", "surrogatepass")
    return "".join(chr(b) if 0x20 <= b < 0x7F else f"\\{b:02X}" for b in raw)


def _quoted(v: str, special: str) -> str:
    if any(c in v for c in special):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return v


def _xfcc_value(value: str) -> str:
    return _quoted(clean(value), ',;="\\')


def _list_value(value: str) -> str:
    """One element of a comma list (X-Client-DNS): a SAN holding ',' must not read as two
    names the CA never issued, so such a value is quoted as in XFCC (docs/headers.md)."""
    return _quoted(clean(value), ',;"\\ ')


def xfcc_element(peer: PeerIdentity, by: str | None) -> bytes:
    """One XFCC element for *peer*, Envoy's format (By, Hash, Subject, URI..., DNS...)."""
    parts = []
    if by:
        parts.append("By=" + _xfcc_value(by))
    parts.append("Hash=" + peer.sha256)
    parts.append('Subject="' + peer.subject + '"')  # already ASCII with RFC 2253 escapes
    parts.extend("URI=" + _xfcc_value(u) for u in peer.uri)
    parts.extend("DNS=" + _xfcc_value(d) for d in peer.dns)
    return ";".join(parts).encode("ascii")


def simple_headers(peer: PeerIdentity | None) -> list[tuple[str, str]]:
    """The ``simple`` dialect: X-Client-Subject, -Cert-Sha256, -SPIFFE-ID, -DNS, -Verified."""
    if peer is None:
        return [("X-Client-Verified", "NONE")]
    out = [("X-Client-Subject", peer.subject), ("X-Client-Cert-Sha256", peer.sha256)]
    if peer.spiffe_id is not None:
        out.append(("X-Client-SPIFFE-ID", clean(peer.spiffe_id)))
    if peer.dns:
        out.append(("X-Client-DNS", ",".join(_list_value(d) for d in peer.dns)))
    out.append(("X-Client-Verified", "SUCCESS"))
    return out


@dataclass(frozen=True, slots=True)
class IdentityBlock:
    """The identity headers of one connection, encoded once (the per-request cost is a join)."""

    lines: bytes  # every dialect except XFCC, as wire lines
    xfcc: bytes | None  # our XFCC element, or None for anonymous / no xfcc dialect
    mode: XfccMode

    def xfcc_line(self, incoming: list[bytes]) -> bytes:
        """The XFCC header line for one request, given the client's XFCC values."""
        if self.xfcc is None or self.mode == "sanitize":
            return b""  # anonymous, or XFCC disabled: the client's copy is dropped, none is set
        if self.mode == "sanitize_set":
            value = self.xfcc
        elif self.mode == "forward_only":
            value = b",".join(incoming)
        else:  # append_forward
            value = b",".join([*incoming, self.xfcc])
        return b"x-forwarded-client-cert: %s\r\n" % value if value else b""


def identity_block(
    peer: PeerIdentity | None, dialects: tuple[str, ...], mode: XfccMode, by: str | None
) -> IdentityBlock:
    """Encode the identity headers for *peer* (None: an anonymous connection)."""
    lines: list[str] = []
    if "simple" in dialects:
        lines.extend(f"{k}: {v}\r\n" for k, v in simple_headers(peer))
    if peer is not None:
        for name, encode in (
            ("rfc9440", dialects_mod.rfc9440),
            ("tomcat", dialects_mod.tomcat),
            ("traefik", dialects_mod.traefik),
        ):
            if name in dialects:
                lines.extend(f"{k}: {v}\r\n" for k, v in encode(peer))
    xfcc = xfcc_element(peer, by) if peer is not None and "xfcc" in dialects else None
    return IdentityBlock("".join(lines).encode("ascii"), xfcc, mode)
