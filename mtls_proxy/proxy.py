"""The data plane: one asyncio.Protocol per client connection.

Request bytes are parsed by llhttp (httptools) in strict mode; the head is validated, authorized
and re-serialized with the proxy's own framing and identity headers; bodies stream both ways with
back-pressure. Identity and its header block are computed once per connection.

Rules:
1. Reject ambiguity at the edge and re-serialize everything (SECURITY.md §8): client framing
   headers are never copied; an invalid request is answered and the connection closed, and no
   byte of it reaches the upstream.
2. Requests on one connection are answered strictly in order; pipelined requests wait (bounded:
   reading pauses while one is queued).
3. A response that cannot be completed closes the client connection; it never hangs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Final

import httptools

from mtls_proxy.errors import (
    BadRequest,
    ExpectationFailed,
    HeaderTooLarge,
    MethodNotAllowed,
    NotImplementedCoding,
    ProxyError,
    RequestTimeout,
    UpstreamTimeout,
    VersionNotSupported,
)
from mtls_proxy.headers import IdentityBlock, ResponseHeaders, split_request_headers
from mtls_proxy.identity import PeerIdentity, identity_from_der
from mtls_proxy.policy import Decision, decide
from mtls_proxy.upstream import LENGTH, NONE, UpstreamConnection

if TYPE_CHECKING:
    from mtls_proxy.shared import Shared

access_log = logging.getLogger("mtls_proxy.access")
logger = logging.getLogger(__name__)

_BUFFER_LIMIT: Final = 256 * 1024


class NotImplementedUpgrade(NotImplementedCoding):
    """An Upgrade request with a body: upgrades are never tunnelled."""

    public_message = "protocol upgrades are not supported"


_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_REASONS: Final = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    417: b"Expectation Failed",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


class _Stop(Exception):
    """Raised inside a parser callback to stop parsing with an error response."""

    def __init__(self, error: ProxyError) -> None:
        self.error = error


class Exchange:
    """One request/response pair on a client connection."""

    __slots__ = (
        "body",
        "body_done",
        "buffered",
        "chunked",
        "client_chunked",
        "close",
        "decision",
        "expect",
        "has_body",
        "head",
        "http10",
        "is_head",
        "method",
        "path",
        "response_started",
        "rule",
        "sent",
        "start",
        "started",
        "status",
        "upstream",
        "upstream_status",
    )

    def __init__(self, method: bytes, path: bytes, http10: bool) -> None:
        self.method, self.path, self.http10 = method, path, http10
        self.is_head = method == b"HEAD"
        self.head = b""
        self.body: list[bytes] = []
        self.buffered = 0
        self.body_done = False
        self.has_body = False
        self.chunked = False
        self.expect = False
        self.close = http10
        self.upstream: UpstreamConnection | None = None
        self.sent = False
        self.started = False
        self.response_started = False
        self.client_chunked = False
        self.status = 0
        self.upstream_status = 0
        self.decision = "deny"
        self.rule: str | None = None
        self.start = time.monotonic()


class ClientConnection(asyncio.Protocol):
    """A downstream mTLS connection (after the handshake)."""

    def __init__(self, shared: Shared, on_close: asyncio.Semaphore) -> None:
        self.shared = shared
        self._slot = on_close
        self.transport: asyncio.Transport | None = None
        self.peer: PeerIdentity | None = None
        self.client_ip = b"-"
        self.block: IdentityBlock | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._raw: list[tuple[bytes, bytes]] = []
        self._in_head = False
        self._head_bytes = 0
        self._queue: list[Exchange] = []
        self._last: Exchange | None = None
        self._paused: set[str] = set()
        self._upstream_paused = False
        self._out: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._up_timer: asyncio.TimerHandle | None = None
        self._decision: tuple[object, Decision] | None = None
        self.draining = False
        self.closed = False

    # -- connection lifecycle --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Identify the peer once, precompute its header block, wait for the first request."""
        self.transport = t = transport  # type: ignore[assignment]  # an SSL stream transport
        shared = self.shared
        sslobj = t.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        self.peer = identity_from_der(der) if der else None
        peername = t.get_extra_info("peername")
        self.client_ip = str(peername[0]).encode() if isinstance(peername, tuple) else b"unix"
        self.block = shared.identity_block(self.peer)
        shared.connections.add(self)
        shared.metrics.connections_open.inc()
        self._arm(shared.cfg.idle_timeout, self._on_idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        """Release everything the connection holds."""
        self.closed = True
        self._cancel_timers()
        for ex in self._queue:
            if ex.upstream is not None:
                ex.upstream.close()  # a response in flight can't be reused
                ex.upstream = None
        self._queue.clear()
        self.shared.connections.discard(self)
        self.shared.metrics.connections_open.dec()
        self._slot.release()

    def pause_writing(self) -> None:
        """The client reads slowly: stop reading the upstream."""
        ex = self._queue[0] if self._queue else None
        if ex is not None and ex.upstream is not None and ex.upstream.transport is not None:
            ex.upstream.transport.pause_reading()
            self._upstream_paused = True

    def resume_writing(self) -> None:
        """The client caught up."""
        if self._upstream_paused:
            self._upstream_paused = False
            ex = self._queue[0] if self._queue else None
            if ex is not None and ex.upstream is not None and ex.upstream.transport is not None:
                ex.upstream.transport.resume_reading()

    def drain(self) -> None:
        """Shutdown: close now if idle, else after the response in flight."""
        self.draining = True
        if not self._queue and not self._in_head and self.transport is not None:
            self.transport.close()

    # -- reading ---------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        """Feed the parser; turn parse errors into a final error response."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # Upgrades are not tunnelled: the request went upstream as a plain request (Upgrade
            # stripped); the bytes after it are parsed as HTTP by a fresh parser (SMG-058).
            self._parser = httptools.HttpRequestParser(self)
            rest = data[exc.args[0] :]
            if rest:
                self.data_received(rest)
            return
        except httptools.HttpParserCallbackError as exc:
            ctx = exc.__context__
            self._reject(ctx.error if isinstance(ctx, _Stop) else BadRequest())
            if not isinstance(ctx, _Stop):
                logger.exception("parser callback failed")
            return
        except httptools.HttpParserError:
            self._reject(BadRequest())
            return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.shared.cfg.max_header_bytes:
                self._reject(HeaderTooLarge())

    def on_message_begin(self) -> None:
        """A new request starts: the header timeout replaces the idle timeout."""
        self._url, self._raw, self._in_head, self._head_bytes = b"", [], True, 0
        if not self._queue:
            self._arm(self.shared.cfg.header_timeout, self._on_header_timeout)

    def on_url(self, url: bytes) -> None:
        """Collect the request target."""
        self._url += url
        self._head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """Collect a header; trailers (after the head) are dropped (HDR-009)."""
        if self._in_head:
            self._raw.append((name, value))
            self._head_bytes += len(name) + len(value) + 4
            if self._head_bytes > self.shared.cfg.max_header_bytes:
                raise _Stop(HeaderTooLarge())

    def on_headers_complete(self) -> None:
        """Validate and queue the request; start it when it is first in line."""
        self._in_head = False
        ex = self._build()
        self._queue.append(ex)
        self._last = ex
        if len(self._queue) == 1:
            self._cancel_timer()
            self._start(ex)

    def on_body(self, body: bytes) -> None:
        """Stream a body piece upstream, or buffer it until the upstream is ready."""
        ex = self._last
        if ex is None or ex.status:
            return  # already answered (denied or failed): the rest of the body is discarded
        data = b"%x\r\n%s\r\n" % (len(body), body) if ex.chunked else body
        if ex.upstream is not None and ex.sent:
            ex.upstream.write(data)
        else:
            ex.body.append(data)
            ex.buffered += len(data)
            if ex.buffered > _BUFFER_LIMIT:
                self._pause("buffer")

    def on_message_complete(self) -> None:
        """The request body is complete."""
        ex = self._last
        if ex is None:
            return
        ex.body_done = True
        if ex.chunked and not ex.status:
            if ex.upstream is not None and ex.sent:
                ex.upstream.write(b"0\r\n\r\n")
            else:
                ex.body.append(b"0\r\n\r\n")
        if len(self._queue) > 1 and self._queue[-1] is ex:
            self._pause("queue")  # pipelined: wait until the earlier response is done (rule 2)

    # -- request validation ----------------------------------------------------------------
    def _build(self) -> Exchange:
        p = self._parser
        version = p.get_http_version()
        method = p.get_method()
        ex = Exchange(method, self._url, version == "1.0")
        rh = split_request_headers(self._raw)
        try:
            if version not in ("1.0", "1.1"):
                raise _Stop(VersionNotSupported())
            if method == b"CONNECT":
                raise _Stop(MethodNotAllowed())
            target = self._url
            if target[:1] != b"/":
                if target == b"*" and method == b"OPTIONS":
                    pass
                elif target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
                    # Absolute-form: forward origin-form only; the scheme is never trusted.
                    slash = target.find(b"/", target.find(b"//") + 2)
                    target = target[slash:] if slash > 0 else b"/"
                else:
                    raise _Stop(BadRequest())
            hash_at = target.find(b"#")
            if hash_at >= 0:
                target = target[:hash_at]  # a fragment is not part of the request-target
            ex.path = target
            if len(rh.hosts) > 1 or (not rh.hosts and not ex.http10):
                raise _Stop(BadRequest())
            host = rh.hosts[0] if rh.hosts else self.shared.upstream_host
            if not host or b"," in host or b" " in host or b"\t" in host:
                raise _Stop(BadRequest())
            framing = b""
            if rh.transfer_encoding:
                if ex.http10:
                    raise _Stop(BadRequest())  # RFC 9112 §6.1: faulty framing in HTTP/1.0
                if b",".join(rh.transfer_encoding).strip(b" \t").lower() != b"chunked":
                    raise _Stop(NotImplementedCoding())
                ex.chunked = ex.has_body = True
                framing = b"Transfer-Encoding: chunked\r\n"
            elif rh.content_length is not None:
                length = int(rh.content_length)
                ex.has_body = length > 0
                framing = b"Content-Length: %d\r\n" % length
            if rh.expect:
                if b",".join(rh.expect).strip().lower() != b"100-continue":
                    raise _Stop(ExpectationFailed())
                ex.expect = not ex.http10
        except _Stop as stop:
            ex.status = stop.error.status
            ex.head = b""
            ex.decision = "deny"
            self._error_for(ex, stop.error)
            return ex
        if not p.should_keep_alive():
            ex.close = True
        if p.should_upgrade() and ex.has_body:
            # llhttp hands everything after an upgrade request's head to the new protocol, so
            # its body can't be framed; upgrades without a body are forwarded as plain requests.
            ex.status = NotImplementedUpgrade.status
            self._error_for(ex, NotImplementedUpgrade())
            return ex
        block = self.block
        assert block is not None  # noqa: S101 -- set in connection_made before any data
        ex.head = b"".join(
            (
                ex.method,
                b" ",
                target,
                b" HTTP/1.1\r\nHost: ",
                host,
                b"\r\n",
                rh.forwarded_lines(),
                b"X-Forwarded-For: ",
                self.client_ip,
                b"\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: ",
                host,
                b"\r\n",
                block.lines,
                block.xfcc_line(rh.xfcc),
                framing,
                b"\r\n",
            )
        )
        return ex

    def _error_for(self, ex: Exchange, err: ProxyError) -> None:
        # Stored on the exchange; sent when it is first in line (responses stay in order).
        ex.body = [self._error_bytes(err.status, err.error, err.public_message, ex.is_head, True)]
        ex.close = True

    # -- dispatch --------------------------------------------------------------------------
    def _decide(self, ex: Exchange) -> Decision:
        policy = self.shared.policy
        cached = self._decision
        if cached is not None and cached[0] is policy:
            return cached[1]
        decision = decide(policy, self.peer, ex.method.decode("latin-1"), ex.path.decode("latin-1"))
        self._decision = (policy, decision)
        return decision

    def _start_next(self) -> None:
        if self._queue and not self._queue[0].started and not self.closed:
            self._start(self._queue[0])

    def _start(self, ex: Exchange) -> None:
        """Answer or forward the exchange at the head of the queue."""
        ex.started = True
        if ex.status:  # invalid request: its error response is prepared (rule 1)
            self._out.extend(ex.body)
            self._finish(ex)
            return
        d = self._decide(ex)
        ex.decision, ex.rule = d.kind, d.rule
        if not d.allowed:
            if d.kind == "deny":
                logger.info(
                    "request denied",
                    extra={
                        "peer": self.peer.subject if self.peer else None,
                        "reason": d.reason,
                        "path": ex.path.decode("latin-1"),
                    },
                )
            # A body we will not read makes the connection unusable: close after answering.
            ex.close = ex.close or (ex.has_body and not ex.body_done)
            ex.status = d.status
            error = "forbidden" if d.status == 403 else "unauthorized"
            self._out.append(self._error_bytes(d.status, error, d.reason, ex.is_head, ex.close))
            self._finish(ex)
            return
        if ex.expect and not ex.body_done:
            self._out.append(_CONTINUE)
        conn = self.shared.pool.take_idle()
        if conn is not None:
            self._dispatch(ex, conn)
        else:
            asyncio.get_running_loop().create_task(self._connect(ex))

    async def _connect(self, ex: Exchange) -> None:
        try:
            conn = await self.shared.pool.connect()
        except ProxyError as exc:
            kind = "timeout" if exc.status == 504 else "connect"
            if not self.closed and self._queue and self._queue[0] is ex:
                self._upstream_failed(ex, exc, kind)
            else:
                self.shared.metrics.upstream_errors.labels(kind=kind).inc()
            return
        if self.closed or not self._queue or self._queue[0] is not ex:
            self.shared.pool.release(conn)
            return
        self._dispatch(ex, conn)

    def _dispatch(self, ex: Exchange, conn: UpstreamConnection) -> None:
        ex.upstream = conn
        conn.begin(self, ex.is_head)
        if ex.body:
            conn.write(b"".join((ex.head, *ex.body)))
            ex.body.clear()
            ex.buffered = 0
        else:
            conn.write(ex.head)
        ex.sent = True
        self._resume("buffer")
        self.flush()
        self._up_timer = asyncio.get_running_loop().call_later(
            self.shared.cfg.upstream_timeout, self._on_upstream_timeout, ex
        )

    # -- upstream events (ResponseSink) ----------------------------------------------------
    def upstream_first_byte(self) -> None:
        """The upstream answered in time."""
        if self._up_timer is not None:
            self._up_timer.cancel()
            self._up_timer = None

    def on_response_head(
        self, status: int, reason: bytes, headers: ResponseHeaders, mode: int, length: int
    ) -> None:
        """Write the re-framed response head."""
        ex = self._queue[0]
        ex.status = ex.upstream_status = status
        ex.response_started = True
        if self.draining:
            ex.close = True
        if mode == NONE:
            # HEAD and 304 keep the upstream's Content-Length (it describes the GET body).
            framing = (
                b"Content-Length: %s\r\n" % headers.content_length[0]
                if headers.content_length and status != 204 and status >= 200
                else b""
            )
        elif mode == LENGTH:
            framing = b"Content-Length: %d\r\n" % length
        elif ex.http10:
            framing, ex.close = b"", True  # close-delimited for HTTP/1.0 clients
        else:
            framing, ex.client_chunked = b"Transfer-Encoding: chunked\r\n", True
        if ex.close:
            conn = b"Connection: close\r\n"
        else:
            conn = b"Connection: keep-alive\r\n" if ex.http10 else b""
        self._out.append(
            b"HTTP/1.1 %d %s\r\n%s%s%s\r\n"
            % (status, reason, b"".join(headers.lines), framing, conn)
        )

    def on_response_body(self, data: bytes) -> None:
        """Queue a body piece for the client."""
        if self._queue[0].client_chunked:
            if data:
                self._out.append(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self._out.append(data)

    def on_response_end(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Return the upstream connection and finish the exchange."""
        ex = self._queue[0]
        if ex.client_chunked:
            self._out.append(b"0\r\n\r\n")
        if not ex.body_done:
            # The upstream answered before reading the whole body (e.g. 413): neither side can
            # be resynchronised cheaply, so both connections close (SMG-057).
            reusable, ex.close = False, True
        ex.upstream = None
        if reusable:
            self.shared.pool.release(conn)
        else:
            conn.close()
        self._finish(ex)

    def on_upstream_error(self, conn: UpstreamConnection, exc: ProxyError, kind: str) -> None:
        """The upstream failed: 502/504 before the response started, else close the client."""
        if not self._queue or self._queue[0].upstream is not conn:
            return
        ex = self._queue[0]
        ex.upstream = None
        conn.close()
        if ex.response_started:
            self.shared.metrics.upstream_errors.labels(kind=kind).inc()
            ex.close = True
            self._finish(ex, aborted=True)
            return
        if conn.reused and kind == "reset" and not ex.has_body:
            # A pooled connection the upstream closed as we reused it: retry once, fresh.
            ex.sent = False
            conn.reused = False
            self._cancel_up_timer()
            asyncio.get_running_loop().create_task(self._connect(ex))
            return
        self._upstream_failed(ex, exc, kind)

    def _upstream_failed(self, ex: Exchange, exc: ProxyError, kind: str) -> None:
        self.shared.metrics.upstream_errors.labels(kind=kind).inc()
        logger.warning(
            "upstream %s: %s",
            kind,
            exc.public_message,
            extra={"upstream": self.shared.cfg.upstream.url},
        )
        ex.status = exc.status
        ex.close = ex.close or not ex.body_done
        self._out.append(
            self._error_bytes(exc.status, exc.error, exc.public_message, ex.is_head, ex.close)
        )
        self._finish(ex)

    def flush(self) -> None:
        """Write what the upstream side produced, in one TLS write."""
        out = self._out
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def pause_client_reading(self, paused: bool) -> None:
        """Back-pressure from the upstream socket."""
        if paused:
            self._pause("upstream")
        else:
            self._resume("upstream")

    # -- completion ------------------------------------------------------------------------
    def _finish(self, ex: Exchange, aborted: bool = False) -> None:
        self._cancel_up_timer()
        self.flush()
        shared = self.shared
        shared.metrics.request(ex.decision, ex.status)
        duration = time.monotonic() - ex.start
        shared.metrics.observe(duration)
        if shared.cfg.access_log:
            access_log.info(
                "access",
                extra={
                    "peer": self.peer.subject if self.peer else None,
                    "client": self.client_ip.decode(),
                    "method": ex.method.decode("latin-1"),
                    "path": ex.path.split(b"?", 1)[0].decode("latin-1"),
                    "status": ex.status,
                    "upstream_status": ex.upstream_status or None,
                    "decision": ex.decision,
                    "rule": ex.rule,
                    "duration_ms": round(duration * 1000, 3),
                    **({"aborted": True} if aborted else {}),
                },
            )
        if self._queue and self._queue[0] is ex:
            self._queue.pop(0)
        t = self.transport
        if t is None:
            return
        if ex.close or self.draining:
            t.close()
            return
        self._resume("queue")
        if self._queue:
            # Next pipelined request: from the loop, not recursively (thousands may be queued).
            asyncio.get_running_loop().call_soon(self._start_next)
        elif self._in_head:
            self._arm(shared.cfg.header_timeout, self._on_header_timeout)
        else:
            self._arm(shared.cfg.idle_timeout, self._on_idle_timeout)

    def _reject(self, err: ProxyError) -> None:
        """A request that cannot even be queued: answer it after what is in flight, then close."""
        self._in_head = False
        last = self._last
        if last is not None and not last.body_done and not last.status and last in self._queue:
            # The body of an accepted request is malformed: abort that exchange (rule 1).
            last.body_done = True
            if last is not self._queue[0]:
                last.status = err.status
                self._error_for(last, err)
                self._pause("error")
                return
            if last.upstream is not None:
                last.upstream.close()
                last.upstream = None
            last.close = True
            if last.response_started:
                self._finish(last, aborted=True)
                return
            last.status = err.status
            self._out.append(
                self._error_bytes(err.status, err.error, err.public_message, last.is_head, True)
            )
            self._finish(last)
            return
        if self._queue:
            ex = Exchange(b"-", self._url or b"-", False)
            ex.status, ex.body_done = err.status, True
            self._error_for(ex, err)
            self._queue.append(ex)
            self._pause("error")
            return
        logger.info(
            "bad request: %s", err.public_message, extra={"client": self.client_ip.decode()}
        )
        self.shared.metrics.request("deny", err.status)
        if self.transport is not None:
            self.transport.write(
                self._error_bytes(err.status, err.error, err.public_message, False, True)
            )
            self.transport.close()

    @staticmethod
    def _error_bytes(status: int, error: str, reason: str, is_head: bool, close: bool) -> bytes:
        body = json.dumps({"error": error, "reason": reason}).encode()
        return (
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (
                status,
                _REASONS.get(status, b"Error"),
                len(body),
                b"Connection: close\r\n" if close else b"",
                b"" if is_head else body,
            )
        )

    # -- flow control and timers -----------------------------------------------------------
    def _pause(self, reason: str) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused.add(reason)

    def _resume(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def _arm(self, delay: float, callback: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)  # type: ignore[arg-type]  # a bound method

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _cancel_up_timer(self) -> None:
        if self._up_timer is not None:
            self._up_timer.cancel()
            self._up_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_timer()
        self._cancel_up_timer()

    def _on_idle_timeout(self) -> None:
        if not self._queue and self.transport is not None:
            self.transport.close()

    def _on_header_timeout(self) -> None:
        if self._in_head and not self._queue:
            self._reject(RequestTimeout())
        elif not self._queue and self.transport is not None:
            self.transport.close()

    def _on_upstream_timeout(self, ex: Exchange) -> None:
        self._up_timer = None
        conn = ex.upstream
        if conn is None or ex.response_started or not self._queue or self._queue[0] is not ex:
            return
        ex.upstream = None
        conn.close()
        self._upstream_failed(ex, UpstreamTimeout(), "timeout")
