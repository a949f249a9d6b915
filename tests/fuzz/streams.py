"""Hypothesis strategies for HTTP/1.1 request streams aimed at a routing, identity-injecting proxy.

A ``Stream`` is what one client connection sends: requests serialized back to back (pipelined),
cut into one or more writes. The generators lean on what desynchronizes parsers (HTTP Garden's
catalogue, at our scale): framing headers and their look-alikes (``Content_Length``, odd case,
duplicates, CL+TE, ``gzip, chunked``), chunk syntax (sizes, extensions, bad CRLFs, trailers),
path spellings that servers resolve differently (``..;``, ``/.;/``, ``%2e%2e``, ``//``,
``;jsessionid``), odd methods, upgrades, ``Connection: close`` mid-pipeline, ``Expect``, and forged
identity/forwarding headers whose values all contain ``forged``.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

FORGED = "forged"
HOST = (b"Host", b"localhost")
# Headers a client may not set: every value carries FORGED so any leak is visible upstream.
FORGED_HEADERS: list[tuple[bytes, bytes]] = [
    (b"x-client-subject", b"CN=forged"),
    (b"X_Client_Subject", b"CN=forged"),
    (b"X-Client-Verified", b"SUCCESS-forged"),
    (b"X-Client-SPIFFE-ID", b"spiffe://forged/admin"),
    (b"x_client_cert_sha256", b"forged"),
    (b"X-Forwarded-Client-Cert", b'Hash=forged;Subject="CN=forged"'),
    (b"X_Forwarded_Client_Cert", b"By=forged"),
    (b"ssl_client_cert", b"-----BEGIN CERTIFICATE----- forged -----END CERTIFICATE-----"),
    (b"SSL-Client-Cert", b"forged"),
    (b"ssl_cipher", b"forged"),
    (b"Client-Cert", b":Zm9yZ2Vk: forged"),
    (b"X-Forwarded-Tls-Client-Cert", b"forged"),
    (b"X-Forwarded-For", b"10.0.0.1, forged"),
    (b"X_Forwarded_For", b"forged"),
    (b"X-Forwarded-Host", b"forged.example"),
    (b"X-Forwarded-Proto", b"forged"),
    (b"X-Forwarded-Prefix", b"/forged"),
    (b"X-Forwarded-Port", b"4433-forged"),
    (b"X-Original-URL", b"/admin/forged"),
    (b"X-Rewrite-URL", b"/admin/forged"),
    (b"X-Original-Host", b"forged"),
    (b"Forwarded", b"for=forged;proto=https"),
    (b"X-Real-IP", b"forged"),
]
# A complete request to hide in a body or after a framing trick: if any upstream ever acts on it,
# the proxy was desynchronized from that upstream.
SMUGGLED = [
    b"GET /admin/smuggled HTTP/1.1\r\nHost: localhost\r\nx-client-subject: CN=forged\r\n\r\n",
    b"POST /public/smuggled HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /admin/smuggled HTTP/1.1\r\nHost: localhost\r\nX-Original-URL: /admin/forged\r\n"
    b"Content-Length: 40\r\n\r\n",  # a prefix: it swallows the start of the next request
]
PATH_SEGMENTS = [
    "public", "admin", "x", "..", ".", "..;", ".;", ";", "..;v=1", "%2e%2e", "%2E%2e", "%2e",
    "", "admin;jsessionid=x", "public;x=1", "%61dmin", "ADMIN", "%2fadmin", "%2Fadmin", "%5c",
    "a%00", "%252e%252e", "..%2f", "%2e%2e;", "%c0%ae%c0%ae", "admin%3bx", "*",
]  # fmt: skip
NAMED_PATHS = [
    "/public/..;/admin/x", "/.;/admin", "/;/admin", "/public/..;v=1/admin", "/public/%2e%2e/admin",
    "//admin", "/admin;jsessionid=x", "/public%2f..%2fadmin", "/public/x", "/admin/x", "/other",
    "/public/%2e%2e;/admin/x", "/public/.%2e/admin", "/%2e%2e/admin", "/public/..;/..;/admin",
]  # fmt: skip
METHODS = [b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"PATCH"]
ODD_METHODS = [b"PURGE", b"FOO", b"M-SEARCH", b"get", b"TRACE", b"G_ET", b"CONNECT", b"PRI"]
CL_NAMES = [b"Content-Length", b"content-length", b"CONTENT-LENGTH", b"cOnTeNt-LeNgTh"]
CL_LOOKALIKES = [b"Content_Length", b"content_length", b"CONTENT_LENGTH", b"Content-Length_"]
TE_NAMES = [b"Transfer-Encoding", b"transfer-encoding", b"TRANSFER-ENCODING"]
TE_LOOKALIKES = [b"Transfer_Encoding", b"transfer_encoding"]
TE_VALUES = [
    b"chunked", b"Chunked", b"CHUNKED", b"gzip, chunked", b"chunked, gzip", b"identity",
    b"chunked, chunked", b" chunked", b"chunked ", b"\tchunked", b",chunked", b"chunked,",
    b"x-chunked", b"chunked;q=1", b"identity, chunked",
]  # fmt: skip
# Look-alikes are weighted up: a name that folds to Content-Length is the classic desync.
FRAMINGS = ["none", "cl", "te", "te", "lookalike", "lookalike", "lookalike", "dup_cl", "cl_te"]
FRAMINGS += ["te_lookalike"]
TRAILERS = [
    b"X-Trailer: v", b"Content-Length: 5", b"x-client-subject: CN=forged",
    b"Transfer-Encoding: chunked", b"X_Forwarded_For: forged",
]  # fmt: skip


@dataclass(frozen=True)
class Stream:
    """What one client connection writes, and what the client needs to read the answers."""

    writes: tuple[bytes, ...]
    heads: tuple[bool, ...]  # per generated request: is it HEAD (its answer has no body)

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)


PLAIN_PATHS = ["/public/x", "/public", "/other", "/admin/x", "/x/y?q=1", "/public/a/b?c=d"]


@st.composite
def targets(draw: st.DrawFn, method: bytes, wild: bool) -> bytes:
    """A request-target: a plain or a known-tricky path, or (*wild*) one built from segments."""
    kind = draw(
        st.sampled_from(
            ["segments", "segments", "named", "absolute", "star"]
            if wild
            else ["plain", "plain", "named"]
        )
    )
    if kind == "plain":
        return draw(st.sampled_from(PLAIN_PATHS)).encode()
    if kind == "star":
        return b"*" if method == b"OPTIONS" else b"/*"
    if kind == "segments":
        segs = draw(st.lists(st.sampled_from(PATH_SEGMENTS), min_size=1, max_size=5))
        path = "/" + "/".join(segs)
    else:
        path = draw(st.sampled_from(NAMED_PATHS))
    if wild:
        path += draw(st.sampled_from(["", "", "?q=1", "?x=/admin", "?../admin", "#frag", "?a=%2f"]))
    if kind == "absolute":
        path = draw(st.sampled_from(["http://localhost", "https://evil.test", "HTTP://a"])) + path
    return path.encode()


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["empty", "text", "text", "bytes", "smuggled", "smuggled"]))
    if kind == "empty":
        return b""
    if kind == "text":
        return draw(st.sampled_from([b"a", b"hello", b"x" * 17, b"0\r\n\r\n", b"\r\n"]))
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=24))
    return draw(st.sampled_from(SMUGGLED))


def _cl_value(draw: st.DrawFn, n: int) -> bytes:
    kind = draw(st.sampled_from(["ok"] * 6 + ["off", "zero", "odd", "big"]))
    if kind == "ok":
        return b"%d" % n
    if kind == "off":
        return b"%d" % max(0, n + draw(st.sampled_from([-3, -1, 1, 2])))
    if kind == "zero":
        return b"0"
    if kind == "big":
        return b"%d" % (n + 40)
    return draw(st.sampled_from([b"0%d" % n, b"+%d" % n, b"%d, %d" % (n, n), b"0x%x" % n, b"-1"]))


@st.composite
def chunked(draw: st.DrawFn, payload: bytes) -> bytes:
    """*payload* as a chunked body: well formed, or odd in one place (size, extension, the CRLF
    after the data, the last chunk, the trailers, or the final CRLF)."""
    odd = draw(st.sampled_from(["none", "none", "size", "ext", "crlf", "last", "trailer", "end"]))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(payload) - 1)), max_size=2)))
    pieces = [payload[i:j] for i, j in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    pieces = [p for p in pieces if p]
    where = draw(st.integers(0, max(0, len(pieces) - 1)))
    out = b""
    for i, piece in enumerate(pieces):
        size, ext, end = b"%x" % len(piece), b"", b"\r\n"
        if i == where and odd == "size":
            size = draw(
                st.sampled_from(
                    [
                        b"%X" % len(piece),
                        b"00%x" % len(piece),
                        b" %x" % len(piece),
                        b"%x " % len(piece),
                        b"+%x" % len(piece),
                        b"0x%x" % len(piece),
                        b"%x" % (len(piece) + 1),
                        b"1" + b"0" * 16,
                        b"g",
                    ]
                )
            )
        elif i == where and odd == "ext":
            ext = draw(
                st.sampled_from([b";a=b", b";a", b';a="b c"', b"; a=b", b";a=b\n", b";\x00"])
            )
        elif i == where and odd == "crlf":
            end = draw(st.sampled_from([b"\n", b"", b"XX", b"\r", b"\r\r\n"]))
        out += size + ext + b"\r\n" + piece + end
    last = b"0"
    if odd == "last":
        last = draw(st.sampled_from([b"000", b"0;ext=1", b"0 ", b"00000000000000000"]))
    trailers = (
        draw(st.lists(st.sampled_from(TRAILERS), min_size=1, max_size=2))
        if odd == "trailer"
        else []
    )
    final = draw(st.sampled_from([b"\n", b"", b"\r"])) if odd == "end" else b"\r\n"
    return out + last + b"\r\n" + b"".join(t + b"\r\n" for t in trailers) + final


@st.composite
def framing(draw: st.DrawFn, payload: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(framing header lines, body bytes) for *payload*."""
    kind = draw(st.sampled_from(FRAMINGS))
    cl = (draw(st.sampled_from(CL_NAMES)), _cl_value(draw, len(payload)))
    if kind == "none":
        return [], payload if draw(st.booleans()) else b""
    if kind == "cl":
        return [cl], payload
    if kind == "lookalike":  # e.g. Content-Length: N + Content_Length: 0
        fake = (draw(st.sampled_from(CL_LOOKALIKES)), draw(st.sampled_from([b"0", b"1", b"100"])))
        lines = [cl, fake]
        if draw(st.booleans()):
            lines.reverse()
        return (lines if draw(st.integers(0, 3)) else [fake]), payload
    if kind == "dup_cl":
        other = (draw(st.sampled_from(CL_NAMES)), draw(st.sampled_from([cl[1], b"0", b"1"])))
        return [cl, other], payload
    te = (draw(st.sampled_from(TE_NAMES)), draw(st.sampled_from(TE_VALUES)))
    body = draw(chunked(payload))
    if kind == "te":
        return [te], body
    if kind == "cl_te":
        both = [cl, te]
        if draw(st.booleans()):
            both.reverse()
        return both, body
    fake_te = (draw(st.sampled_from(TE_LOOKALIKES)), b"chunked")
    return ([fake_te, cl] if draw(st.booleans()) else [fake_te]), body


def _connection_upgrade(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    connection = draw(
        st.sampled_from(
            [None, b"close", b"keep-alive", b"Upgrade", b"x-client-subject", b"close, Upgrade"]
        )
    )
    lines = [] if connection is None else [(b"Connection", connection)]
    upgrade = draw(st.sampled_from([None, "websocket", "websocket", "h2c", "other"]))
    if upgrade == "websocket":
        lines += [
            (b"Upgrade", b"websocket"),
            (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            (b"Sec-WebSocket-Version", b"13"),
        ]
        if connection is None:
            lines.append((b"Connection", b"Upgrade"))
    elif upgrade == "h2c":
        lines += [(b"Upgrade", b"h2c"), (b"HTTP2-Settings", b"AAMAAABkAARAAAAAAAIAAAAA")]
        if connection is None:
            lines.append((b"Connection", b"Upgrade, HTTP2-Settings"))
    elif upgrade == "other":
        lines.append((b"Upgrade", b"foo/2"))
    return lines


FOCI = ["plain", "path", "path", "framing", "framing", "chunks", "method", "connection", "expect"]
FOCI += ["syntax", "host"]


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    """One serialized request and whether it is HEAD. Each request is odd in at most one respect
    (its focus), so that most reach the upstream; the forged headers ride on any of them."""
    focus = draw(st.sampled_from(FOCI))
    method = draw(st.sampled_from(METHODS + ODD_METHODS if focus == "method" else METHODS))
    target = draw(targets(method, wild=focus == "path"))
    version = b"HTTP/1.0" if draw(st.integers(0, 15)) == 15 else b"HTTP/1.1"
    body_ok = method not in (b"GET", b"HEAD", b"OPTIONS") or draw(st.integers(0, 3)) == 3
    payload = draw(payloads()) if body_ok or focus in ("framing", "chunks") else b""
    if focus == "framing":
        frame, body = draw(framing(payload))
    elif focus == "chunks":
        frame, body = [(b"Transfer-Encoding", b"chunked")], draw(chunked(payload))
    elif payload or method in (b"POST", b"PUT", b"PATCH"):
        frame, body = [(b"Content-Length", b"%d" % len(payload))], payload
    else:
        frame, body = [], b""
    host = [HOST]
    if focus == "host":
        host = draw(st.sampled_from([[], [HOST, HOST], [(b"host", b"localhost:8443")]]))
    lines = host + frame + draw(st.lists(st.sampled_from(FORGED_HEADERS), max_size=3, unique=True))
    if focus == "connection":
        lines += _connection_upgrade(draw)
    elif focus == "expect":
        lines.append((b"Expect", draw(st.sampled_from([b"100-continue", b"100-Continue", b"x"]))))
    lines = draw(st.permutations(lines))
    head = method + b" " + target + b" " + version + b"\r\n"
    head += b"".join(k + b": " + v + b"\r\n" for k, v in lines)
    if focus == "syntax":
        odd = draw(
            st.sampled_from(
                [
                    b"X-Folded: a\r\n x-client-subject: CN=forged\r\n",  # obs-fold
                    b"Content-Length : 0\r\n",
                    b"X_Client_Subject : forged\r\n",
                    b"X-A: b\n",  # bare LF
                    b"X-A: b\rX-B: c\r\n",  # bare CR
                    b" Content-Length: 3\r\n",
                ]
            )
        )
        if draw(st.booleans()):
            head += odd
        else:  # or the request line itself
            head = head.replace(
                b" HTTP/1.", draw(st.sampled_from([b" HTTP/1.2 x", b" http/1.", b"  HTTP/1."])), 1
            )
    return head + b"\r\n" + body, method == b"HEAD"


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    """One to four requests on one connection, written in one go or cut into several writes."""
    reqs = draw(st.lists(requests(), min_size=1, max_size=4))
    data = b"".join(r for r, _ in reqs)
    how = draw(st.sampled_from(["one", "one", "per_request", "cuts"]))
    if how == "one" or len(data) < 2:
        writes = [data]
    elif how == "per_request":
        writes = [r for r, _ in reqs]
    else:
        cuts = sorted(draw(st.sets(st.integers(1, len(data) - 1), min_size=1, max_size=3)))
        writes = [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return Stream(tuple(writes), tuple(h for _, h in reqs))
