"""One request/response exchange on a client connection, and the connection-level identity
lines (RFC 9440's chain, Tomcat's TLS info) that proxy.ClientConnection computes once."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from mtls_proxy.dialects import rfc9440_chain, tomcat_tls
from mtls_proxy.response import error_response

if TYPE_CHECKING:
    import ssl

    from mtls_proxy.errors import ProxyError
    from mtls_proxy.upstream import UpstreamConnection

SSL_DER: Final = 2  # _ssl.ENCODING_DER, for Certificate.public_bytes (Python 3.13+)


def connection_identity(dialects: tuple[str, ...], sslobj: ssl.SSLObject) -> bytes:
    """The identity lines that depend on the connection: RFC 9440's chain, Tomcat's TLS info."""
    pairs: list[tuple[str, str]] = []
    if "rfc9440" in dialects:
        # The certificates the client sent after its leaf: public from Python 3.13, the same C
        # method on the inner object since 3.10.
        get_chain = getattr(sslobj, "get_unverified_chain", None) or getattr(
            getattr(sslobj, "_sslobj", None), "get_unverified_chain", None
        )
        if get_chain is not None:
            chain = get_chain() or []
            pairs += rfc9440_chain(tuple(c.public_bytes(SSL_DER) for c in chain[1:]))
    if "tomcat" in dialects:
        cipher = sslobj.cipher()
        session = sslobj.session
        pairs += tomcat_tls(
            cipher[0] if cipher else None,
            session.id if session else None,
            cipher[2] if cipher else None,
        )
    return "".join(f"{k}: {v}\r\n" for k, v in pairs).encode("ascii")


class Exchange:
    """One request/response pair on a client connection."""

    __slots__ = (
        "body",
        "body_done",
        "buffered",
        "bytes_in",
        "bytes_out",
        "chunked",
        "client_chunked",
        "close",
        "decision",
        "early",
        "expect",
        "has_body",
        "head",
        "http10",
        "is_head",
        "length",
        "method",
        "path",
        "reason",
        "request_id",
        "response_started",
        "rule",
        "sent",
        "sent_at",
        "start",
        "started",
        "status",
        "upstream",
        "upstream_ms",
        "upstream_status",
        "ws_key",
    )

    sent_at: float  # when the head went upstream (monotonic): set by the dispatch, read after

    def __init__(self, method: bytes, path: bytes, http10: bool) -> None:
        self.method, self.path, self.http10 = method, path, http10
        self.is_head = method == b"HEAD"
        self.head = b""
        self.body: list[bytes] = []
        self.buffered = self.bytes_in = self.bytes_out = 0  # body bytes, for the access log
        self.body_done = self.has_body = self.chunked = self.expect = False
        self.length = 0  # the Content-Length the parser frames the body with
        self.close = http10
        self.ws_key: bytes | None = None
        self.early = False  # the upstream answered before the whole request body was sent
        self.upstream: UpstreamConnection | None = None
        self.sent = self.started = self.response_started = self.client_chunked = False
        self.status = self.upstream_status = 0
        self.decision = "deny"
        self.rule: str | None = None
        self.reason: str | None = None  # why the policy denies or the proxy refused (the log)
        self.request_id = b""  # as forwarded upstream in X-Request-Id (request.py rule 3)
        self.upstream_ms: float | None = None  # from then to the response head
        self.start = time.monotonic()

    def fail(self, err: ProxyError) -> None:
        """Turn this exchange into a final error response (sent when it is first in line); the
        access record's reason is what the client is told."""
        self.status = err.status
        self.reason = err.public_message
        self.close = True
        self.body = [error_response(err.status, err.error, err.public_message, self.is_head, True)]
