"""The data plane: one asyncio.Protocol per client connection.

Request bytes are parsed by llhttp (httptools) in strict mode; request.prepare() validates the head
and builds the upstream's; the policy decides; bodies stream both ways with back-pressure. The
identity and its header block are computed once per connection.

Rules:
1. Reject ambiguity at the edge and re-serialize everything (docs/security.md): an invalid request
   is answered and the connection closed, and no byte of it reaches the upstream.
2. Requests on one connection are answered strictly in order; pipelined requests wait (bounded:
   reading pauses while one is queued).
3. A response that cannot be completed closes the client connection; it never hangs.
4. Timeouts are deadlines checked by the listener's sweeper (Shared.sweep), not one timer per
   request: re-arming a timer per request costs more than the whole policy decision.
5. The only protocol switch is a WebSocket (websocket.py): after the upstream's valid 101 the
   connection becomes a byte tunnel (``tunnel``); until then it is HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import ssl
import time
from typing import TYPE_CHECKING, Final

import httptools
from cryptography import x509

from mtls_proxy.chains import keep_session, verified_ders
from mtls_proxy.errors import (
    BadRequest,
    HeaderTooLarge,
    IdentityTooLarge,
    ProxyError,
    RequestTimeout,
    UpstreamTimeout,
    URITooLong,
)
from mtls_proxy.exchange import Exchange, connection_identity
from mtls_proxy.handshakes import SEEN
from mtls_proxy.headers import LOOKALIKE, classify
from mtls_proxy.identity import PeerIdentity, identity_from_der
from mtls_proxy.paths import match_path
from mtls_proxy.policy import Decision, decide_route
from mtls_proxy.request import UnderscoreHeader, prepare
from mtls_proxy.response import ResponseHead, client_head, error_response
from mtls_proxy.strict import strict_refusal
from mtls_proxy.websocket import client_switch

if TYPE_CHECKING:
    from mtls_proxy.headers import IdentityBlock
    from mtls_proxy.shared import Shared
    from mtls_proxy.upstream import UpstreamConnection

logger = logging.getLogger(__name__)

_BUFFER_LIMIT: Final = 256 * 1024
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_IDLE, _HEADER, _BODY = 1, 2, 3


class _Stop(Exception):
    """Raised inside a parser callback to stop parsing with an error response."""

    def __init__(self, error: ProxyError) -> None:
        self.error = error


class _Final(Exception):
    """Raised when a request starts after one whose answer closes the connection: RFC 9112
    section 9.6, no further request is processed; its bytes are never parsed (INT-010)."""


class ClientConnection(asyncio.Protocol):
    """A downstream mTLS connection (after the handshake)."""

    # Slots: thousands of idle connections are the normal case for a sidecar (issue: 10,000
    # held open under 400 MB), and a per-instance __dict__ would cost a kilobyte each.
    __slots__ = (
        "_decision",
        "_head_bytes",
        "_identity_too_large",
        "_in_head",
        "_issuers",
        "_last",
        "_log_fields",
        "_out",
        "_parser",
        "_paused",
        "_port",
        "_queue",
        "_raw",
        "_resumed",
        "_rid",
        "_rid_prefix",
        "_slots",
        "_upstream_paused",
        "_url",
        "_waiting",
        "block",
        "client_ip",
        "closed",
        "deadline",
        "draining",
        "peer",
        "refused",
        "send_deadline",
        "shared",
        "sslobj",
        "transport",
        "tunnel",
        "up_deadline",
        "ws_pending",
    )

    def __init__(self, shared: Shared, slots: asyncio.Semaphore) -> None:
        self.shared = shared
        self._slots = slots
        self.transport: asyncio.Transport | None = None
        self.peer: PeerIdentity | None = None
        self.client_ip = b"-"
        self._port = b""
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
        self._decision: tuple[object, object, Decision] | None = None
        self.deadline = 0.0  # idle or header deadline (loop time); 0 = none
        self._waiting = _IDLE
        self.up_deadline = 0.0  # first upstream byte expected by then
        self.send_deadline = 0.0  # writing is paused: the client must take a byte by then
        self._log_fields = ""  # the access record's connection part (connection_made)
        # Request IDs: a random prefix per connection and a counter (cheaper than urandom each).
        self._rid_prefix = b""
        self._rid = 0
        self._identity_too_large = False
        self.draining = False
        self.closed = False
        self.tunnel: UpstreamConnection | None = None  # a WebSocket after the upstream's 101
        self.ws_pending: bytes | None = None  # bytes after an upgrade request, until its answer
        self.refused: tuple[str, str] | None = None  # (reason, why): a post-handshake check
        self.sslobj: ssl.SSLObject | None = None
        # A resumed session: the issuers its leaf was verified with (chains.py; None = unknown).
        self._resumed = False
        self._issuers: tuple[x509.Certificate, ...] | None = None

    # -- connection lifecycle --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Identify the peer once, precompute its header block, wait for the first request."""
        self.transport = t = transport  # type: ignore[assignment]  # an SSL stream transport
        shared = self.shared
        self.sslobj = sslobj = t.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        self.peer = identity_from_der(der) if der else None
        if self.peer is not None and sslobj is not None:
            if sslobj.session_reused:
                self._resumed = True
                self._issuers = shared.chains.recall(self.peer.sha256)
            else:
                shared.chains.remember(self.peer.sha256, verified_ders(sslobj)[1:])
        peername = t.get_extra_info("peername")
        self.client_ip = str(peername[0]).encode() if isinstance(peername, tuple) else b"unix"
        sockname = t.get_extra_info("sockname")
        if isinstance(sockname, tuple):
            self._port = b"%d" % sockname[1]
        self._rid_prefix = os.urandom(6).hex().encode()
        if shared.access_log is not None:
            # The server-side SSLObject has no SNI: handshakes.py read it from the ClientHello
            # (this runs in the handshake's context).
            seen = SEEN.get()
            cipher = sslobj.cipher() if sslobj is not None else None
            self._log_fields = shared.access_log.connection_fields(
                self.peer,
                self.client_ip.decode(),
                peername[1] if isinstance(peername, tuple) else None,
                sslobj.version() if sslobj is not None else None,
                cipher[0] if cipher else None,
                seen.sni if seen is not None else None,
            )
        block = shared.identity_block(self.peer)
        if self.peer is not None and sslobj is not None:
            extra = connection_identity(shared.cfg.identity_headers, sslobj)
            if extra:
                block = dataclasses.replace(block, lines=block.lines + extra)
        self.block = block
        size = len(block.lines) + len(block.xfcc or b"")
        self._identity_too_large = size > shared.cfg.max_identity_header_bytes
        if self._identity_too_large:
            logger.warning(
                "identity headers exceed --max-identity-header-bytes; requests on "
                "this connection get 431",
                extra={
                    "bytes": size,
                    "limit": shared.cfg.max_identity_header_bytes,
                    "peer_sha256": self.peer.sha256 if self.peer else None,
                },
            )
        shared.connections.add(self)
        shared.metrics.connections_open.inc()
        if self.peer is not None and (
            shared.revocation is not None or shared.cfg.strict_client_certs
        ):
            # Checks OpenSSL does not make (strict.py; revocation.py with --crl-expired allow
            # and a stale CRL); nothing of this connection has been read yet.
            self.refused = self._post_handshake_refusal(der)
            if self.refused is not None:
                self.sslobj = None  # its session is not kept (connection_lost)
                self.closed = True
                # The handshake is over (TLS 1.3: our Finished went first), so no alert can
                # name the reason: an HTTP 403 does, ahead of the request, as nginx answers a
                # certificate refused after its handshake with a 400 page. Never forwarded.
                reason, why = self.refused
                answer = error_response(
                    403, "client_certificate_refused", f"{reason}: {why}", False, True
                )
                t.refuse(answer)  # type: ignore[attr-defined]  # tlsconn.TLSServerLayer
                return
        self._wait(_IDLE)
        if shared.draining:
            self.drain()

    def _post_handshake_refusal(self, der: bytes | None) -> tuple[str, str] | None:
        """(reason label, message) when a check after the handshake refuses the client."""
        shared = self.shared
        if shared.cfg.strict_client_certs and der:
            problem = strict_refusal(x509.load_der_x509_certificate(der))
            if problem is not None:
                return "bad_certificate", f"--strict-client-certs: {problem}"
        if shared.revocation is not None:
            chain = self.verified_chain()
            if chain is None:
                return "unknown_ca", "a resumed session whose verified chain is not known"
            reason = shared.revocation.refuses(chain)
            if reason is not None:
                return reason, "refused by the CRLs enforced after the handshake"
        return None

    def verified_chain(self) -> list[x509.Certificate] | None:
        """The client's chain as OpenSSL verified it (leaf first, anchor last): at this
        handshake, or for a resumed session at the full handshake of its leaf (chains.py).
        Empty without a client certificate; None when it is not known (fail closed)."""
        if self.peer is None or self.sslobj is None:
            return []
        if self._resumed:
            if self._issuers is None:
                return None
            leaf = self.sslobj.getpeercert(binary_form=True)
            return [x509.load_der_x509_certificate(leaf), *self._issuers] if leaf else None
        return [x509.load_der_x509_certificate(d) for d in verified_ders(self.sslobj)] or None

    def cut(self) -> None:
        """The reloaded trust refuses this client: close at once, in-flight requests too."""
        self.closed = True
        self.sslobj = None  # its session is not kept (connection_lost)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        """Release everything the connection holds."""
        self.closed = True
        if self.tunnel is not None and self._queue:  # the client ended a WebSocket
            ex = self._queue[0]
            self.tunnel.close()
            ex.upstream = self.tunnel = None
            self._finish(ex)
        for ex in self._queue:
            if ex.upstream is not None:
                ex.upstream.close()  # a response in flight can't be reused
                ex.upstream = None
            if ex.started:
                # Decided (and maybe acted on upstream) but never answered: the client left.
                # Every request the upstream may act on has an access record (nginx's 499).
                ex.status = ex.status or 499
                self._record(ex, aborted=True)
        self._queue.clear()
        if self.sslobj is not None and self.shared.cfg.tls.sessions == "cache":
            keep_session(self.sslobj)
        # This object and its parser reference each other, a cycle only the garbage collector
        # frees, and it runs by object counts, not bytes: holding the transport until then kept
        # the TLS state and uvloop's 256 KiB read buffer of every closed connection alive, and
        # fragmented the heap (RSS grew about 5 KB per connection under handshake load).
        self.transport = None
        self.sslobj = None
        self.shared.connections.discard(self)
        self.shared.metrics.connections_open.dec()
        self._slots.release()

    def pause_writing(self) -> None:
        """The client reads slowly: stop reading the upstream, and give the client
        --send-timeout to take a byte (nginx's send_timeout), or a client that stops reading
        would hold this connection and the upstream's forever."""
        self.send_deadline = self.shared.clock() + self.shared.cfg.send_timeout
        conn = self._queue[0].upstream if self._queue else None
        if conn is not None and conn.transport is not None:
            conn.transport.pause_reading()
            self._upstream_paused = True
            self.up_deadline = 0.0  # the upstream is silent because we stopped reading it

    def resume_writing(self) -> None:
        """The client caught up."""
        self.send_deadline = 0.0
        if self._upstream_paused:
            self._upstream_paused = False
            conn = self._queue[0].upstream if self._queue else None
            if conn is not None and conn.transport is not None:
                conn.transport.resume_reading()
                if self.tunnel is None:
                    self.up_deadline = self.shared.clock() + self.shared.cfg.upstream_timeout

    def eof_received(self) -> bool:
        """The client half-closed (TCP FIN or TLS close_notify): requests it sent whole are
        still answered, then the connection closes (HAProxy's default; nginx would abort them
        with a 499); an incomplete request, an idle connection or a tunnel close now."""
        last = self._last
        if (
            not self._queue
            or self._in_head
            or (last is not None and not last.body_done)
            or self.tunnel is not None
            or self.ws_pending is not None
        ):
            return False
        self.draining = True  # no more requests can come: close after the last answer
        return True

    def drain(self) -> None:
        """Shutdown: close now if idle, else after the response in flight."""
        self.draining = True
        if not self._queue and not self._in_head and self.transport is not None:
            self.transport.close()

    def check_deadlines(self, now: float) -> None:
        """Called by the sweeper: enforce the idle, header, send and upstream timeouts."""
        if self.send_deadline and now >= self.send_deadline:
            self.send_deadline = 0.0
            self._on_send_timeout()
            return
        if self.up_deadline and now >= self.up_deadline:
            self.up_deadline = 0.0
            self._on_upstream_timeout()
        if self.deadline and now >= self.deadline:
            self.deadline = 0.0
            if self._waiting == _BODY:
                if self._paused:  # we stopped reading (back-pressure), not the client
                    self.deadline = now + self.shared.cfg.body_timeout
                else:
                    self._waiting = _IDLE
                    self._reject(RequestTimeout())
                return
            if self._queue or self.transport is None:
                return
            if self._waiting == _HEADER and self._in_head:
                self._reject(RequestTimeout())
            else:
                self.transport.close()

    def _on_send_timeout(self) -> None:
        """The client took no byte for --send-timeout: cut the connection (an orderly close
        would wait for the very writes it refuses); connection_lost records the exchange."""
        if self._queue and not self._queue[0].reason:
            took = self.shared.cfg.send_timeout
            self._queue[0].reason = f"send timeout: the client took no response byte for {took} s"
        if self.transport is not None:
            self.transport.abort()

    def _wait(self, what: int) -> None:
        cfg = self.shared.cfg
        self._waiting = what
        self.deadline = self.shared.clock() + (
            cfg.idle_timeout if what == _IDLE else cfg.header_timeout
        )

    # -- reading ---------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        """Feed the parser; turn parse errors into a final error response."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        if self.tunnel is not None:  # a WebSocket: bytes pass through untouched
            self._queue[0].bytes_in += len(data)
            self.tunnel.write(data)
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            rest = data[exc.args[0] :]
            last = self._last
            if last is not None and last.ws_key is not None and not last.status:
                # A WebSocket upgrade on its way upstream: what follows is frames after a 101,
                # or the next request if the upstream declines. Hold it until the answer.
                self.ws_pending = rest
                self._pause("upgrade")
                return
            # Any other upgrade went upstream as a plain request (Upgrade stripped); the bytes
            # after it are parsed as HTTP by a fresh parser (SMG-058).
            self._parser = httptools.HttpRequestParser(self)
            if rest:
                self.data_received(rest)
            return
        except httptools.HttpParserCallbackError as exc:
            ctx = exc.__context__
            if isinstance(ctx, _Final):
                self._pause("final")  # the rest of this stream is never read (INT-010)
                return
            if not isinstance(ctx, _Stop):
                logger.error("parser callback failed", exc_info=ctx)
            self._reject(ctx.error if isinstance(ctx, _Stop) else BadRequest())
            return
        except httptools.HttpParserError:
            self._reject(BadRequest())
            return
        if self._in_head:
            # A head split across reads: bound its size and the time it may take.
            self._head_bytes += len(data)
            if self._head_bytes > self.shared.cfg.max_header_bytes:
                self._reject(HeaderTooLarge())
            elif not self._queue and self._waiting != _HEADER:
                self._wait(_HEADER)

    def on_message_begin(self) -> None:
        """A new request starts (its header deadline is set if the head arrives in pieces),
        unless the one before it closes the connection: then nothing more is read."""
        # Every way the connection closes after an answer passes through one of these: an
        # exchange marked close (refusals, Connection: close, HTTP/1.0), a drain, or the end.
        last = self._last
        if (last is not None and last.close) or self.draining or self.closed:
            raise _Final
        self._url, self._raw, self._in_head, self._head_bytes = b"", [], True, 0

    def on_url(self, url: bytes) -> None:
        """Collect the request target."""
        self._url += url
        self._head_bytes += len(url)
        if len(self._url) > self.shared.cfg.max_line_bytes:
            raise _Stop(URITooLong())

    def on_header(self, name: bytes, value: bytes) -> None:
        """Collect a header; trailers (after the head) are dropped (HDR-009)."""
        if self._in_head:
            raw = self._raw
            raw.append((name, value))
            line = len(name) + len(value) + 4
            self._head_bytes += line
            cfg = self.shared.cfg
            if (
                self._head_bytes > cfg.max_header_bytes
                or line > cfg.max_line_bytes
                or len(raw) > cfg.max_headers
            ):
                raise _Stop(HeaderTooLarge())

    def on_headers_complete(self) -> None:
        """Validate and queue the request; start it when it is first in line."""
        self._in_head = False
        p = self._parser
        method = p.get_method()
        version = p.get_http_version()
        ex = Exchange(method, self._url, False)
        self._rid += 1
        ex.request_id = b"%b%04x" % (self._rid_prefix, self._rid)
        block = self.block
        assert block is not None  # noqa: S101 -- set in connection_made, before any data
        try:
            req = prepare(
                method,
                self._url,
                version,
                self._raw,
                upgrade=p.should_upgrade(),
                client_ip=self.client_ip,
                block=block,
                default_host=self.shared.upstream_host,
                normalize=bool(self.shared.policy.routes),
                port=self._port,
                underscores=self.shared.cfg.underscore_headers,
                request_id=ex.request_id,
            )
        except ProxyError as err:
            ex.fail(err)
            if isinstance(err, UnderscoreHeader):
                self._underscored([n for n, _ in self._raw if b"_" in n], "rejected")
        else:
            ex.path, ex.head, ex.chunked, ex.ws_key = req.path, req.head, req.chunked, req.ws_key
            ex.request_id = req.request_id
            ex.has_body, ex.expect, ex.length = req.has_body, req.expect, req.length
            if req.underscored:
                self._underscored(req.underscored, "dropped")
            ex.http10 = version == "1.0"
            ex.close = not p.should_keep_alive()
        self._queue.append(ex)
        self._last = ex
        if len(self._queue) == 1:
            self.deadline = 0.0
            self._start(ex)
        if ex.has_body and not ex.status and not ex.body_done and self.shared.cfg.body_timeout:
            # A body that stops arriving holds an upstream connection: --body-timeout (RES-06).
            self._waiting = _BODY
            self.deadline = self.shared.clock() + self.shared.cfg.body_timeout

    def _underscored(self, names: list[bytes], action: str) -> None:
        """Count and log header names with '_' that were not forwarded (INT-005)."""
        dropped = self.shared.metrics.headers_dropped
        for name in names:
            dropped.labels(
                reason="lookalike" if classify(name)[1] == LOOKALIKE else "underscore"
            ).inc()
        logger.info(
            "request header names with '_' %s",
            action,
            extra={
                "names": [n.decode("latin-1") for n in names[:8]],
                "client": self.client_ip.decode(),
            },
        )

    def on_body(self, body: bytes) -> None:
        """Stream a body piece upstream, or buffer it until the upstream is ready."""
        ex = self._last
        if ex is None or ex.status:
            return  # already answered (denied or failed): the rest of the body is discarded
        ex.bytes_in += len(body)
        if ex.bytes_in > ex.length and not ex.chunked:
            # Cannot happen while the forwarded Content-Length is the one llhttp frames with;
            # if it ever does, no byte beyond the declared length goes upstream (fail closed).
            logger.error("body longer than its Content-Length", extra={"length": ex.length})
            raise _Stop(BadRequest())
        if self._waiting == _BODY:
            self.deadline = self.shared.clock() + self.shared.cfg.body_timeout
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
        if self._waiting == _BODY:
            self._waiting, self.deadline = _IDLE, 0.0
        ex.body_done = True
        if ex.chunked and not ex.status:
            if ex.upstream is not None and ex.sent:
                ex.upstream.write(b"0\r\n\r\n")
            else:
                ex.body.append(b"0\r\n\r\n")
        if ex.upstream is not None and ex.sent and not ex.response_started and not ex.status:
            # The request is complete: --upstream-timeout for the first response byte starts.
            self.up_deadline = self.shared.clock() + self.shared.cfg.upstream_timeout
        if len(self._queue) > 1 and self._queue[-1] is ex:
            self._pause("queue")  # pipelined: wait until the earlier response is done (rule 2)

    # -- dispatch --------------------------------------------------------------------------
    def _decide(self, ex: Exchange) -> Decision:
        # The peer is fixed for the connection, so a decision only changes with the policy
        # (a reload swaps the object) or the route: cache it per (policy, route).
        policy = self.shared.policy
        route = (
            policy.route_for(ex.method.decode("latin-1"), match_path(ex.path))
            if policy.routes
            else None
        )
        cached = self._decision
        if cached is not None and cached[0] is policy and cached[1] is route:
            return cached[2]
        decision = decide_route(policy, route, self.peer)
        self._decision = (policy, route, decision)
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
        if self._identity_too_large:
            # Fail closed: never forward a request whose identity would be cut or rejected.
            ex.fail(IdentityTooLarge())
            self._out.extend(ex.body)
            self._finish(ex)
            return
        d = self._decide(ex)
        ex.decision, ex.rule = d.kind, d.rule
        if d.kind in ("deny", "audit"):
            ex.reason = d.reason  # one record per request: the access record says why
        if not d.allowed:
            # A body we will not read makes the connection unusable: close after answering.
            ex.close = ex.close or (ex.has_body and not ex.body_done)
            ex.status = d.status
            error = "forbidden" if d.status == 403 else "unauthorized"
            self._out.append(error_response(d.status, error, d.reason, ex.is_head, ex.close))
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
        conn.begin(self, ex.is_head, ex.ws_key)
        if ex.body:
            conn.write(b"".join((ex.head, *ex.body)))
            ex.body.clear()
            ex.buffered = 0
        else:
            conn.write(ex.head)
        ex.sent = True
        ex.sent_at = time.monotonic()
        self._resume("buffer")
        self.flush()
        if ex.body_done:  # the wait for the answer starts once the request is complete
            self.up_deadline = self.shared.clock() + self.shared.cfg.upstream_timeout

    # -- upstream events (the ResponseSink of upstream.py) ---------------------------------
    def on_switch(self, head: ResponseHead) -> None:
        """The upstream accepted the WebSocket upgrade: from now on, a byte tunnel."""
        ex = self._queue[0]
        ex.status = ex.upstream_status = 101
        ex.upstream_ms = int((time.monotonic() - ex.sent_at) * 1e6) / 1000  # 3 decimals
        ex.response_started = ex.close = True
        self.tunnel = ex.upstream
        self.up_deadline = self.deadline = 0.0  # a WebSocket may be quiet for hours
        self._out.append(client_switch(head))
        pending, self.ws_pending = self.ws_pending, None
        if pending and self.tunnel is not None:
            ex.bytes_in += len(pending)
            self.tunnel.write(pending)
        self._resume("upgrade")

    def on_tunnel_data(self, data: bytes) -> None:
        """WebSocket bytes from the upstream."""
        self._queue[0].bytes_out += len(data)
        self._out.append(data)

    def on_tunnel_closed(self) -> None:
        """The upstream closed the WebSocket: so does the client."""
        ex = self._queue[0]
        ex.upstream, self.tunnel = None, None
        self._finish(ex)

    def upstream_first_byte(self) -> None:
        """The upstream answered in time; from now on the deadline is for silence (RES-15)."""
        self.up_deadline = self.shared.clock() + self.shared.cfg.upstream_timeout

    def on_response_head(self, head: ResponseHead, mode: int, length: int) -> None:
        """Queue the re-framed response head."""
        ex = self._queue[0]
        ex.status = ex.upstream_status = head.status
        ex.upstream_ms = int((time.monotonic() - ex.sent_at) * 1e6) / 1000  # 3 decimals
        ex.response_started = True
        # An answer before the whole body was sent, or an error answer to a request with a body
        # (an early 413 can race the body: sent completely, yet never read), leaves the upstream
        # in an unknown state: that connection serves no other request (SMG-057).
        ex.early = not ex.body_done or (ex.has_body and head.status >= 400)
        data, ex.client_chunked, ex.close = client_head(
            head, mode, length, ex.http10, ex.close or self.draining
        )
        self._out.append(data)

    def on_response_body(self, data: bytes) -> None:
        """Queue a body piece for the client."""
        ex = self._queue[0]
        ex.bytes_out += len(data)
        if self.up_deadline:
            self.up_deadline = self.shared.clock() + self.shared.cfg.upstream_timeout
        if ex.client_chunked:
            if data:
                self._out.append(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self._out.append(data)

    def on_response_end(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Return the upstream connection and finish the exchange."""
        ex = self._queue[0]
        if ex.client_chunked:
            self._out.append(b"0\r\n\r\n")
        if ex.early:
            # The upstream answered before the whole body was sent (e.g. an early 413): what
            # it does with the rest of the body is unknown, so it never serves another request
            # (SMG-057). If the client is still sending it, the client connection closes too.
            reusable = False
            ex.close = ex.close or not ex.body_done
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
            self._log_upstream_error(ex, kind, exc.public_message, "body")
            ex.close = True
            self._finish(ex, aborted=True)
            return
        if conn.reused and kind == "reset" and not ex.has_body:
            # A pooled connection the upstream closed as we reused it: retry once, fresh.
            ex.sent = False
            self.up_deadline = 0.0
            asyncio.get_running_loop().create_task(self._connect(ex))
            return
        self._upstream_failed(ex, exc, kind)

    def _log_upstream_error(self, ex: Exchange, kind: str, error: str, stage: str) -> None:
        """One record per upstream failure: which upstream, what kind (the label of
        upstream_errors_total), at which stage (before the response head or in the body), and
        the request_id that joins it to the access record."""
        logger.warning(
            "upstream error",
            extra={
                "upstream": self.shared.cfg.upstream.url,
                "kind": kind,
                "stage": stage,
                "error": error,
                "request_id": ex.request_id.decode(),
            },
        )

    def _upstream_failed(self, ex: Exchange, exc: ProxyError, kind: str) -> None:
        self.shared.metrics.upstream_errors.labels(kind=kind).inc()
        self._log_upstream_error(ex, kind, exc.public_message, "head")
        ex.status = exc.status
        ex.close = ex.close or not ex.body_done
        self._out.append(
            error_response(exc.status, exc.error, exc.public_message, ex.is_head, ex.close)
        )
        self._finish(ex)

    def _on_upstream_timeout(self) -> None:
        ex = self._queue[0] if self._queue else None
        if ex is None or ex.upstream is None:
            return
        conn, ex.upstream = ex.upstream, None
        conn.close()
        if ex.response_started:
            # Silent inside the body: the response cannot be completed; the client sees it cut.
            self.shared.metrics.upstream_errors.labels(kind="timeout").inc()
            self._log_upstream_error(ex, "timeout", "the response body stalled", "body")
            ex.close = True
            self._finish(ex, aborted=True)
            return
        self._upstream_failed(ex, UpstreamTimeout(), "timeout")

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
        self.up_deadline = 0.0
        self.flush()
        self._record(ex, aborted)
        if self._queue and self._queue[0] is ex:
            self._queue.pop(0)
        t = self.transport
        if t is None:
            return
        if self.ws_pending is not None and ex.ws_key is not None:
            # A declined WebSocket upgrade: the held bytes are the next request (SMG-058).
            pending, self.ws_pending = self.ws_pending, None
            self._parser = httptools.HttpRequestParser(self)
            self._resume("upgrade")
            if pending and not (ex.close or self.draining):
                asyncio.get_running_loop().call_soon(self.data_received, pending)
        if ex.close or self.draining:
            t.close()
            return
        self._resume("queue")
        if self._queue:
            # Next pipelined request: from the loop, not recursively (thousands may be queued).
            asyncio.get_running_loop().call_soon(self._start_next)
        else:
            self._wait(_HEADER if self._in_head else _IDLE)

    def _record(self, ex: Exchange, aborted: bool) -> None:
        """Count and log one exchange (the access record)."""
        shared = self.shared
        duration = time.monotonic() - ex.start
        shared.metrics.request(ex.decision, ex.status, duration)
        if shared.access_log is not None:
            q = ex.path.find(b"?")  # the query string is not logged: it may carry secrets
            shared.access_log.request(
                self._log_fields,
                ex.method.decode("latin-1"),
                (ex.path if q < 0 else ex.path[:q]).decode("latin-1"),
                ex.status,
                ex.upstream_status,
                ex.decision,
                ex.rule,
                int(duration * 1e6) / 1000,  # ms, 3 decimals: a third of round()'s cost
                ex.bytes_in,
                ex.bytes_out,
                aborted,
                ex.reason,
                ex.request_id.decode(),
                ex.upstream_ms,
            )

    def _reject(self, err: ProxyError) -> None:
        """A request that cannot be parsed: answer in order, then close (rule 1)."""
        self._in_head = False
        last = self._last
        if last is not None and not last.body_done and not last.status and last in self._queue:
            # The body of an accepted request is malformed: abort that exchange.
            last.body_done = True
            if last is not self._queue[0]:
                last.fail(err)
                self._pause("error")
                return
            if last.upstream is not None:
                last.upstream.close()
                last.upstream = None
            last.close = True
            if last.response_started:
                self._finish(last, aborted=True)
                return
            last.fail(err)
            self._out.extend(last.body)
            self._finish(last)
            return
        # A head refused before it was complete (400, 414, 431, 408) is an exchange of its own,
        # so that it has what every answered request has: one access record, with the peer and
        # a request id (nginx logs its 400s in the access log), and the request metrics.
        ex = Exchange(b"-", self._url or b"-", False)
        self._rid += 1
        ex.request_id = b"%b%04x" % (self._rid_prefix, self._rid)
        ex.body_done = True
        ex.fail(err)
        self._queue.append(ex)
        if len(self._queue) > 1:
            self._pause("error")  # answered after the requests before it (rule 2)
            return
        self._start(ex)

    # -- flow control ----------------------------------------------------------------------
    def _pause(self, reason: str) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused.add(reason)

    def _resume(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
