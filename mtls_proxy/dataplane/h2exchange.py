"""One HTTP/2 client stream forwarded to an HTTP/2 (h2c) upstream stream: gRPC, or any stream
with `--upstream-protocol h2c`.

The exchange is the HTTP/1.1 one up to the decision (exchange.Exchange.begin: identity, policy,
refusals, the access record); `forward` then opens an upstream stream instead of taking an
HTTP/1.1 connection. The upstream request head is the one http1.request.prepare built (client
copies of identity headers stripped, ours injected), reframed as an HTTP/2 header block, so
both protocols share one set of header rules.

Rules:
1. Request and response bodies stream both ways at once (bidi gRPC): the response may start
   before the request ends, and neither waits for the other.
2. Trailers are relayed as they come (grpc-status, grpc-message, -bin metadata); a response
   without them ends with END_STREAM on its last DATA frame.
3. Cancellation crosses: a client RST_STREAM resets the upstream stream (CANCEL), an upstream
   reset resets the client's stream with the same code once the response has started; before
   it, the client gets a 502 (gRPC: UNAVAILABLE), or CANCEL when the upstream cancelled.
4. Deadlines: a gRPC call with `grpc-timeout` is the upstream's to enforce (the header goes
   through); the proxy's backstop is that timeout plus a second. Without one, --upstream-timeout
   bounds the wait for the response head only: a gRPC stream may be quiet for long.
5. With `--upstream-protocol http1`, a gRPC call is refused after the decision (a denial is
   still PERMISSION_DENIED), as UNAVAILABLE naming the cause.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Final, Protocol

from hpack import NeverIndexedHeaderTuple

from mtls_proxy.core import grpc
from mtls_proxy.core.errors import ProxyError, UpstreamTimeout, UpstreamUnavailable
from mtls_proxy.dataplane.exchange import Downstream, Exchange

if TYPE_CHECKING:
    from mtls_proxy.dataplane.h2upstream import H2Upstream, H2UpstreamPool

GRACE: Final = 1.0  # seconds past grpc-timeout before the proxy's backstop (rule 4)
BACKLOG: Final = 256 * 1024  # request bytes waiting for the upstream's window: stop reading
CANCEL: Final = 0x8
_HOP: Final = frozenset(
    (b"host", b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te")
) | {b"upgrade"}


# Never in the upstream connection's HPACK table: x-request-id and traceparent are unique per
# request (an entry is pure cost), the others are secrets of one client on a connection shared
# by all (RFC 7541 7.1.3; h2 does this for authorization and cookie only when it normalizes,
# which we turn off).
_NEVER_INDEXED: Final = frozenset(
    (b"x-request-id", b"traceparent", b"authorization", b"proxy-authorization", b"cookie")
)


class GrpcNeedsH2Upstream(UpstreamUnavailable):
    """Rule 5."""

    public_message = "gRPC is not forwarded: --upstream-protocol is http1"


class H2Downstream(Downstream, Protocol):
    """The HTTP/2 client side (h2conn.H2Connection): what an h2 upstream's stream needs more."""

    @property
    def h2pool(self) -> H2UpstreamPool | None:
        """The h2c upstream connections (None: --upstream-protocol http1)."""

    def send_h2_head(
        self, ex: Exchange, headers: list[tuple[bytes, bytes]], end_stream: bool
    ) -> bool:
        """The upstream's response HEADERS, framed for the client; False when the client's
        protocol cannot carry them (h1toh2 rule 1)."""

    def send_trailers(self, ex: Exchange, headers: list[tuple[bytes, bytes]]) -> None:
        """Trailers, after the pending body; they end the stream."""

    def send_reset(self, ex: Exchange, code: int) -> None:
        """RST_STREAM with *code*."""

    def ack(self, ex: Exchange, n: int) -> None:
        """*n* request body bytes were handed on (WINDOW_UPDATE)."""


def h2_request_headers(head: bytes, te_trailers: bool) -> list[tuple[bytes, bytes]]:
    """The prepared HTTP/1.1 head (ours: one field per line, no folding) as an HTTP/2 block."""
    lines = head[:-4].split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    target = rest.rpartition(b" ")[0]
    authority = b""
    fields: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.lower(), value.strip()
        if name == b"host":
            authority = value
        elif name in _NEVER_INDEXED:
            fields.append(NeverIndexedHeaderTuple(name, value))
        elif name not in _HOP:
            fields.append((name, value))
    pseudo = [(b":method", method), (b":scheme", b"http"), (b":authority", authority)]
    pseudo.append((b":path", target))
    if te_trailers:
        fields.append((b"te", b"trailers"))
    return pseudo + fields


class H2Exchange(Exchange):
    """An exchange whose upstream is a stream on an h2c connection."""

    __slots__ = (
        "deadline_fixed",
        "grpc",
        "grpc_code",
        "grpc_timeout",
        "te_trailers",
        "up",
        "up_sid",
    )

    down: H2Downstream

    def __init__(
        self,
        down: H2Downstream,
        method: bytes,
        path: bytes,
        request_id: bytes,
        grpc_call: bool = False,
    ) -> None:
        super().__init__(down, method, path, request_id)
        self.grpc = grpc_call
        self.te_trailers = False
        self.grpc_timeout: bytes | None = None  # the client's grpc-timeout (rule 4)
        self.grpc_code: int | None = None  # the upstream's grpc-status, for the access record
        self.up: H2Upstream | None = None
        self.up_sid = 0
        self.deadline_fixed = False

    def accepts_body(self) -> bool:
        """Request bytes are still wanted: not refused, not over (rule 1)."""
        return self.error is None and (self.up_sid != 0 or not self.status)

    # -- forwarding -------------------------------------------------------------------------------
    def forward(self) -> None:
        """Open the upstream stream (rule 5 when there is no h2c upstream)."""
        pool = self.down.h2pool
        if pool is None:
            self._refuse(GrpcNeedsH2Upstream())
            return
        timeout = grpc.parse_timeout(self.grpc_timeout) if self.grpc_timeout else None
        if timeout is not None:
            self.up_deadline = self.plane.clock() + timeout + GRACE
            self.deadline_fixed = True
        up = pool.take()
        if up is not None:
            self._open(up)
        else:
            asyncio.get_running_loop().create_task(self._connect_h2())

    async def _connect_h2(self) -> None:
        pool = self.down.h2pool
        assert pool is not None  # noqa: S101 -- forward checked it
        try:
            up = await pool.get()
        except ProxyError as exc:
            if self.down.is_current(self):
                self._upstream_failed(exc, "timeout" if exc.status == 504 else "connect")
            return
        if self.down.is_current(self):
            self._open(up)

    def _open(self, up: H2Upstream) -> None:
        headers = h2_request_headers(self.head, self.te_trailers)
        end = self.body_done and not self.body
        self.up, self.up_sid = up, up.open(self, headers, end)
        self.sent = True
        self.sent_at = time.monotonic()
        if self.body or (self.body_done and not end):
            up.send(self.up_sid, b"".join(self.body), self.body_done)
            self.body.clear()
            self.buffered = 0
        if self.body_done and not self.deadline_fixed:
            self._arm_upstream()

    def send_body(self, data: bytes, end: bool = False) -> bool:
        """A request body piece (*end*: the last); acknowledged to the client as it leaves
        (h2upstream rule 1). True when more than BACKLOG bytes wait (an HTTP/1.1 client is
        then not read)."""
        if end:
            self.body_done = True
        if self.up is not None:
            self.up.send(self.up_sid, data, end)
            if end and not self.response_started and not self.deadline_fixed:
                self._arm_upstream()
        elif data:
            self.body.append(data)
            self.buffered += len(data)
        return self.upstream_backlog() > BACKLOG

    def upstream_backlog(self) -> int:
        """Request bytes received and not yet sent upstream."""
        return self.up.backlog(self.up_sid) if self.up is not None else self.buffered

    def end_body(self) -> None:
        """The request body is complete (once: send_body may have said so already)."""
        if self.body_done:
            return
        self.body_done = True
        if self.up is not None:
            self.up.send(self.up_sid, b"", True)
            if not self.response_started and not self.deadline_fixed:
                self._arm_upstream()

    # -- upstream events (h2upstream.StreamSink) ----------------------------------------------
    def on_request_sent(self, n: int) -> None:
        """*n* body bytes left for the upstream: the client may send as many more."""
        self.down.ack(self, n)

    def on_h2_head(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        """Relay the response HEADERS (an HTTP/1.1 client may be unable to take them: 502)."""
        status = next((v for n, v in headers if n == b":status"), b"502")
        code = int(status) if status.isdigit() else 502
        if not self.down.send_h2_head(self, headers, end_stream):
            up, self.up = self.up, None
            if up is not None:
                up.reset(self.up_sid)
            self._upstream_failed(UpstreamUnavailable(), "protocol")
            return
        self.status = self.upstream_status = code
        self.upstream_ms = int((time.monotonic() - self.sent_at) * 1e6) / 1000
        self.response_started = True
        if end_stream:  # trailers-only
            self._note_grpc_status(headers)
        if not self.deadline_fixed:  # rule 4: quiet streams are gRPC's normal
            self.up_deadline = 0.0 if self.grpc else self.up_deadline

    def on_response_body(self, data: bytes) -> None:
        """Relay a DATA payload."""
        self.bytes_out += len(data)
        if self.up_deadline and not self.deadline_fixed:
            self._arm_upstream()
        self.down.send_data(self, data)

    def on_h2_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Relay the trailers (rule 2)."""
        self._note_grpc_status(headers)
        self.down.send_trailers(self, headers)

    def on_h2_end(self) -> None:
        """The response is complete."""
        self.up = None
        self.down.send_end(self)
        self.finish()

    def on_h2_reset(self, code: int) -> None:
        """Rule 3 (code -1: the connection was lost)."""
        if self.up is None or not self.down.is_current(self):
            return
        self.up = None
        if self.response_started:
            self.plane.metrics.upstream_errors.labels(kind="reset").inc()
            self._log_upstream_error("reset", f"stream reset ({code})", "body")
            self.down.send_reset(self, CANCEL if code < 0 else code)
            self.finish(aborted=True)
        elif code == CANCEL:
            self.status = 499
            self.down.send_reset(self, CANCEL)
            self.finish(aborted=True)
        else:
            self._upstream_failed(UpstreamUnavailable(), "reset")

    # -- the client side -------------------------------------------------------------------------
    def pause_upstream(self) -> bool:
        """The client reads slowly: hold the upstream stream's window."""
        if self.up is None:
            return False
        self.up.hold(self.up_sid)
        if not self.deadline_fixed:
            self.up_deadline = 0.0
        return True

    def resume_upstream(self, tunnel: bool) -> None:
        """The client caught up."""
        if self.up is not None:
            self.up.release(self.up_sid)

    def on_upstream_timeout(self) -> None:
        """The backstop deadline passed (rule 4)."""
        up, self.up = self.up, None
        if up is not None:
            up.reset(self.up_sid)
        if self.response_started:
            self.plane.metrics.upstream_errors.labels(kind="timeout").inc()
            self._log_upstream_error("timeout", "the response stalled", "body")
            self.down.send_reset(self, CANCEL)
            self.finish(aborted=True)
            return
        self._upstream_failed(UpstreamTimeout(), "timeout")

    def abandon(self) -> None:
        """The client reset the stream or left: so does the upstream stream (rule 3)."""
        up, self.up = self.up, None
        if up is not None:
            up.reset(self.up_sid)
        super().abandon()

    def grpc_status(self) -> int | None:
        """The upstream's grpc-status, or the one the proxy's refusal carried (core/grpc)."""
        if not self.grpc:
            return None
        if self.grpc_code is not None:
            return self.grpc_code
        if self.status == 499:
            return 1  # CANCELLED: the client cancelled the call
        return (
            grpc.status_for_http(self.status) if self.error or self.upstream_status == 0 else None
        )

    def _note_grpc_status(self, headers: list[tuple[bytes, bytes]]) -> None:
        for name, value in headers:
            if name == b"grpc-status" and value.isdigit() and len(value) <= 3:
                self.grpc_code = int(value)

    def _refuse(self, err: ProxyError) -> None:
        self.status, self.reason = err.status, err.public_message
        self.down.send_error(self, err.status, err.error, err.public_message)
        self.finish()
