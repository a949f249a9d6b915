"""What happens to one request, whatever the client speaks: HTTP/1.1 today, HTTP/2 next.

An `Exchange` is made by the client protocol once a request head is valid (or refused): it
decides under the current policy, sends the prepared upstream head and the body upstream,
relays the response, and accounts and logs once. The client side is a `Downstream`: it frames
what the exchange hands it (a response head, body pieces, an error, a switch) for its protocol
and moves on when told the exchange is done; the exchange never writes client bytes itself.

Rules:
1. One access record and one request metric per exchange that was answered or started, also
   when the client leaves first (status 499, nginx's convention).
2. An upstream connection goes back to the pool only after a clean, complete response; an
   answer before the whole request body was sent (or an error answer to a request with a body)
   leaves the upstream in an unknown state, so that connection serves no other request
   (SMG-057).
3. A failure before the response head is a 502/504 with a short body; after it, the response
   cannot be completed and the client connection is cut (its framing tells the client).
4. Deadlines are attributes checked by the listener's sweeper (`up_deadline`), never timers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final, Protocol

from mtls_proxy.core.errors import IdentityTooLarge, ProxyError, UpstreamTimeout
from mtls_proxy.dataplane.records import write_record
from mtls_proxy.http1.framing import LAST_CHUNK, encode_chunk

if TYPE_CHECKING:
    from mtls_proxy.core.tracecontext import TraceParent
    from mtls_proxy.dataplane.admission import Peer
    from mtls_proxy.dataplane.plane import DataPlane
    from mtls_proxy.dataplane.upstream import UpstreamConnection
    from mtls_proxy.http1.response import BodyMode, ResponseHead

logger = logging.getLogger("mtls_proxy.proxy")  # a stable name: log filters outlive module paths
BUFFER_LIMIT: Final = 256 * 1024  # request body held while the upstream connection opens


class Downstream(Protocol):
    """The client side of exchanges: one client connection, framed by its protocol."""

    plane: DataPlane
    admitted: Peer
    log_fields: str  # the access record's connection part

    @property
    def protocol(self) -> str:
        """http1 or h2: the metrics' and the access log's label."""

    def is_current(self, ex: Exchange) -> bool:
        """*ex* may still be answered now (the connection is open and it is its turn)."""

    def send_continue(self, ex: Exchange) -> None:
        """Tell the client to send the body (HTTP/1.1 100 Continue)."""

    def send_head(self, ex: Exchange, head: ResponseHead, mode: BodyMode, length: int) -> None:
        """The upstream's response head, framed for the client."""

    def send_data(self, ex: Exchange, data: bytes) -> None:
        """A response body piece (or, on a tunnel, raw bytes)."""

    def send_end(self, ex: Exchange) -> None:
        """The response body is complete."""

    def send_error(self, ex: Exchange, status: int, error: str, message: str) -> None:
        """A complete short error response of the proxy's own."""

    def send_switch(self, ex: Exchange, head: ResponseHead) -> None:
        """The upstream accepted a WebSocket upgrade: the connection becomes a tunnel."""

    def flush(self) -> None:
        """Write what was framed so far, in one write."""

    def pause_reading(self, reason: str) -> None:
        """Stop reading the client for *reason* (e.g. the upstream is slow to read)."""

    def resume_reading(self, reason: str) -> None:
        """*reason* no longer holds."""

    def done(self, ex: Exchange) -> None:
        """*ex* is over (answered, failed or cut): close or go on with the next."""


class Exchange:
    """One request/response pair, and the upstream connection serving it."""

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
        "down",
        "early",
        "error",
        "expect",
        "has_body",
        "head",
        "http10",
        "is_head",
        "length",
        "method",
        "path",
        "plane",
        "reason",
        "request_id",
        "response_started",
        "rule",
        "sent",
        "sent_at",
        "span",
        "start",
        "started",
        "status",
        "trace",
        "up_deadline",
        "upstream",
        "upstream_ms",
        "upstream_status",
        "ws_key",
    )

    sent_at: float  # when the head went upstream (monotonic): set by the dispatch, read after
    trace: TraceParent | None  # the trace context forwarded upstream (request.py rule 4)
    span: object  # the proxy's span for it (telemetry/tracing.py), or None

    def __init__(self, down: Downstream, method: bytes, path: bytes, request_id: bytes) -> None:
        self.down, self.plane = down, down.plane
        self.method, self.path, self.request_id = method, path, request_id
        self.is_head = method == b"HEAD"
        self.http10 = self.close = False
        self.head = b""  # the upstream request head (request.prepare)
        self.body: list[bytes] = []  # request body held until the upstream connection is ready
        self.buffered = self.bytes_in = self.bytes_out = 0  # body bytes, for the access log
        self.body_done = self.has_body = self.chunked = self.expect = False
        self.length = 0  # the Content-Length the parser frames the body with
        self.ws_key: bytes | None = None
        self.early = False  # the upstream answered before the whole request body was sent
        self.upstream: UpstreamConnection | None = None
        self.sent = self.started = self.response_started = self.client_chunked = False
        self.status = self.upstream_status = 0
        self.error: tuple[int, str, str] | None = None  # a refusal: (status, error, message)
        self.decision = "deny"
        self.rule: str | None = None
        self.reason: str | None = None  # why the policy denies or the proxy refused (the log)
        self.upstream_ms: float | None = None  # from then to the response head
        self.up_deadline = 0.0  # the upstream's next byte is due by then (loop time); 0 = none
        self.start = time.monotonic()
        self.trace, self.span = None, None

    def fail(self, err: ProxyError) -> None:
        """Make this a final error response (sent when it starts); the access record's reason
        is what the client is told."""
        self.status = err.status
        self.reason = err.public_message
        self.close = True
        self.error = (err.status, err.error, err.public_message)

    # -- the request -------------------------------------------------------------------------
    def begin(self) -> None:
        """Answer or forward: the client protocol calls this when the exchange may start."""
        self.started = True
        down = self.down
        if not self.status and down.admitted.identity_too_large:
            # Fail closed: never forward a request whose identity would be cut or rejected.
            self.fail(IdentityTooLarge())
        if self.error is not None:  # an invalid request: the proxy answers it
            down.send_error(self, *self.error)
            self.finish()
            return
        d = down.admitted.decide(self.plane.gen.policy, self.method, self.path)
        self.decision, self.rule = d.kind, d.rule
        if d.kind in ("deny", "audit"):
            self.reason = d.reason  # one record per request: the access record says why
        if not d.allowed:
            # A body we will not read makes the connection unusable: close after answering.
            self.close = self.close or (self.has_body and not self.body_done)
            self.status = d.status
            down.send_error(
                self, d.status, "forbidden" if d.status == 403 else "unauthorized", d.reason
            )
            self.finish()
            return
        self.forward()

    def forward(self) -> None:
        """The request is allowed: send it upstream (HTTP/1.1 here; h2exchange for HTTP/2)."""
        if self.expect and not self.body_done:
            self.down.send_continue(self)
        conn = self.plane.pool.take_idle()
        if conn is not None:
            self._dispatch(conn)
        else:
            asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        pool = self.plane.pool
        try:
            conn = await pool.connect()
        except ProxyError as exc:
            kind = "timeout" if exc.status == 504 else "connect"
            if self.down.is_current(self):
                self._upstream_failed(exc, kind)
            else:
                self.plane.metrics.upstream_errors.labels(kind=kind).inc()
            return
        if not self.down.is_current(self):
            pool.release(conn)
            return
        self._dispatch(conn)

    def _dispatch(self, conn: UpstreamConnection) -> None:
        self.upstream = conn
        conn.begin(self, self.is_head, self.ws_key)
        if self.body:
            conn.write(b"".join((self.head, *self.body)))
            self.body.clear()
            self.buffered = 0
        else:
            conn.write(self.head)
        self.sent = True
        self.sent_at = time.monotonic()
        self.down.resume_reading("buffer")
        self.down.flush()
        if self.body_done:  # the wait for the answer starts once the request is complete
            self._arm_upstream()

    def send_body(self, data: bytes) -> bool:
        """A request body piece: upstream now, or held until the connection is ready. True when
        too much is held (the client protocol stops reading until the dispatch)."""
        if self.chunked:
            data = encode_chunk(data)
        if self.upstream is not None and self.sent:
            self.upstream.write(data)
            return False
        self.body.append(data)
        self.buffered += len(data)
        return self.buffered > BUFFER_LIMIT

    def end_body(self) -> None:
        """The request body is complete."""
        self.body_done = True
        if self.status:
            return
        sent = self.upstream is not None and self.sent
        if self.chunked:
            if sent:
                self.upstream.write(LAST_CHUNK)  # type: ignore[union-attr]  # sent: set
            else:
                self.body.append(LAST_CHUNK)
        if sent and not self.response_started:
            # The request is complete: --upstream-timeout for the first response byte starts.
            self._arm_upstream()

    # -- back-pressure from the client ------------------------------------------------------
    def pause_upstream(self) -> bool:
        """The client reads slowly: stop reading the upstream (True if there was one)."""
        if self.upstream is None or not self.upstream.pause_reading():
            return False
        self.up_deadline = 0.0  # the upstream is silent because we stopped reading it
        return True

    def resume_upstream(self, tunnel: bool) -> None:
        """The client caught up."""
        conn = self.upstream
        if conn is not None and conn.transport is not None:
            conn.resume_reading()
            if not tunnel:
                self._arm_upstream()

    # -- upstream events (upstream.ResponseSink) ---------------------------------------------
    def on_switch(self, head: ResponseHead) -> None:
        """The upstream accepted the WebSocket upgrade: from now on, a byte tunnel."""
        self.status = self.upstream_status = 101
        self.upstream_ms = int((time.monotonic() - self.sent_at) * 1e6) / 1000  # 3 decimals
        self.response_started = self.close = True
        self.up_deadline = 0.0  # a WebSocket may be quiet for hours
        self.down.send_switch(self, head)

    def on_tunnel_data(self, data: bytes) -> None:
        """WebSocket bytes from the upstream."""
        self.bytes_out += len(data)
        self.down.send_data(self, data)

    def on_tunnel_closed(self) -> None:
        """The upstream closed the WebSocket: so does the client."""
        self.upstream = None
        self.finish()

    def upstream_first_byte(self) -> None:
        """The upstream answered in time; from now on the deadline is for silence (RES-15)."""
        plane = self.plane  # inline, not _arm_upstream: this runs for every response
        self.up_deadline = plane.clock() + plane.cfg.upstream_timeout

    def on_response_head(self, head: ResponseHead, mode: BodyMode, length: int) -> None:
        """Relay the response head."""
        self.status = self.upstream_status = head.status
        self.upstream_ms = int((time.monotonic() - self.sent_at) * 1e6) / 1000  # 3 decimals
        self.response_started = True
        # Rule 2: an early answer, or an error answer to a request with a body (an early 413
        # can race the body: sent completely, yet never read).
        self.early = not self.body_done or (self.has_body and head.status >= 400)
        self.down.send_head(self, head, mode, length)

    def on_response_body(self, data: bytes) -> None:
        """Relay a body piece."""
        self.bytes_out += len(data)
        if self.up_deadline:  # inline, not _arm_upstream: this runs for every body piece
            plane = self.plane
            self.up_deadline = plane.clock() + plane.cfg.upstream_timeout
        self.down.send_data(self, data)

    def on_response_end(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Return the upstream connection and finish."""
        self.down.send_end(self)
        if self.early:
            # Rule 2. If the client is still sending the body, its connection closes too.
            reusable = False
            self.close = self.close or not self.body_done
        self.upstream = None
        if reusable:
            self.plane.pool.release(conn)
        else:
            conn.close()
        self.finish()

    def on_upstream_error(self, conn: UpstreamConnection, exc: ProxyError, kind: str) -> None:
        """Rule 3."""
        if self.upstream is not conn or not self.down.is_current(self):
            return
        self.upstream = None
        conn.close()
        if self.response_started:
            self.plane.metrics.upstream_errors.labels(kind=kind).inc()
            self._log_upstream_error(kind, exc.public_message, "body")
            self.close = True
            self.finish(aborted=True)
            return
        if conn.reused and kind == "reset" and not self.has_body:
            # A pooled connection the upstream closed as we reused it: retry once, fresh.
            self.sent = False
            self.up_deadline = 0.0
            asyncio.get_running_loop().create_task(self._connect())
            return
        self._upstream_failed(exc, kind)

    def on_upstream_timeout(self) -> None:
        """The sweeper found `up_deadline` passed (rule 3)."""
        conn, self.upstream = self.upstream, None
        if conn is None:
            return
        conn.close()
        if self.response_started:
            # Silent inside the body: the response cannot be completed; the client sees it cut.
            self.plane.metrics.upstream_errors.labels(kind="timeout").inc()
            self._log_upstream_error("timeout", "the response body stalled", "body")
            self.close = True
            self.finish(aborted=True)
            return
        self._upstream_failed(UpstreamTimeout(), "timeout")

    def flush(self) -> None:
        """Write what the upstream's bytes produced, in one client write."""
        self.down.flush()

    def pause_client_reading(self, paused: bool) -> None:
        """Back-pressure from the upstream socket."""
        if paused:
            self.down.pause_reading("upstream")
        else:
            self.down.resume_reading("upstream")

    def _arm_upstream(self) -> None:
        """The upstream's next byte is due within --upstream-timeout from now (rule 4)."""
        self.up_deadline = self.plane.clock() + self.plane.cfg.upstream_timeout

    def _upstream_failed(self, exc: ProxyError, kind: str) -> None:
        self.plane.metrics.upstream_errors.labels(kind=kind).inc()
        self._log_upstream_error(kind, exc.public_message, "head")
        self.status = exc.status
        self.close = self.close or not self.body_done
        self.down.send_error(self, exc.status, exc.error, exc.public_message)
        self.finish()

    def _log_upstream_error(self, kind: str, error: str, stage: str) -> None:
        """One record per upstream failure: which upstream, what kind (the label of
        upstream_errors_total), at which stage (before the response head or in the body), and
        the request_id that joins it to the access record."""
        logger.warning(
            "upstream error",
            extra={
                "upstream": self.plane.cfg.upstream.url,
                "kind": kind,
                "stage": stage,
                "error": error,
                "request_id": self.request_id.decode(),
            },
        )

    # -- the end -----------------------------------------------------------------------------
    def finish(self, aborted: bool = False) -> None:
        """Account for this exchange (rule 1) and hand the connection back to the client side."""
        self.up_deadline = 0.0
        self.down.flush()
        self.record(aborted)
        self.down.done(self)

    def abandon(self) -> None:
        """The client connection is gone: drop the upstream (a response in flight cannot be
        reused) and, if the request was acted on, record it as aborted (rule 1)."""
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        if self.started:
            self.status = self.status or 499
            self.record(aborted=True)

    def record(self, aborted: bool) -> None:
        """Count and log the exchange (the access record), and end its span (records.py)."""
        write_record(self, aborted)

    def grpc_status(self) -> int | None:
        """The call's grpc-status for the access record: a gRPC exchange's (h2exchange)."""
        return None
