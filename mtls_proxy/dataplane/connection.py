"""The HTTP/1.1 client protocol: one asyncio.Protocol per client connection, after admission.

Request bytes are parsed by llhttp (httptools) in strict mode; request.prepare() validates each
head and builds the upstream's; an `Exchange` (exchange.py) does the rest of each request. This
class is the thin adapter around them: parse, queue exchanges in order, frame their responses
for HTTP/1.1, flow control (flow.py) and deadlines.

Rules:
1. Reject ambiguity at the edge and re-serialize everything (docs/security.md): an invalid request
   is answered and the connection closed, and no byte of it reaches the upstream.
2. Requests on one connection are answered strictly in order; pipelined requests wait (bounded:
   reading pauses while one is queued).
3. A response that cannot be completed closes the client connection; it never hangs.
4. Timeouts are deadlines checked by the listener's sweeper (check_deadlines), not one timer
   per request: re-arming a timer per request costs more than the whole policy decision.
5. The only protocol switch is a WebSocket (websocket.py): after the upstream's valid 101 the
   transport is handed to a `Tunnel` (tunnel.py); until then it is HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from mtls_proxy.core.errors import BadRequest, ProxyError
from mtls_proxy.core.headers import LOOKALIKE, classify
from mtls_proxy.dataplane.admission import connection_facts
from mtls_proxy.dataplane.deadlines import WAIT_BODY, WAIT_HEAD, WAIT_IDLE, Http1Deadlines
from mtls_proxy.dataplane.exchange import Exchange
from mtls_proxy.dataplane.flow import ReadGate
from mtls_proxy.dataplane.h1toh2 import Http1ToH2
from mtls_proxy.dataplane.h2exchange import H2Exchange
from mtls_proxy.dataplane.reader import RequestReader, Stop
from mtls_proxy.dataplane.tlsconn import keep_session
from mtls_proxy.dataplane.tunnel import Tunnel
from mtls_proxy.dataplane.upgrade import Http1Upgrade
from mtls_proxy.dataplane.writer import Http1Framing
from mtls_proxy.http1.request import UnderscoreHeader, prepare

if TYPE_CHECKING:
    from collections.abc import Callable

    from cryptography import x509

    from mtls_proxy.core.identity import PeerIdentity
    from mtls_proxy.dataplane.admission import Peer
    from mtls_proxy.dataplane.plane import DataPlane

logger = logging.getLogger("mtls_proxy.proxy")  # a stable name: log filters outlive module paths


class Http1Connection(Http1Framing, Http1Deadlines, Http1Upgrade, Http1ToH2, asyncio.Protocol):
    """A client connection speaking HTTP/1.1 (plane.Connection, exchange.Downstream)."""

    protocol = "http1"  # the metrics' and access log's protocol label

    # Slots: thousands of idle connections are the normal case for a sidecar (issue: 10,000
    # held open under 400 MB), and a per-instance __dict__ would cost a kilobyte each.
    __slots__ = (
        "_last",
        "_out",
        "_port",
        "_queue",
        "_release",
        "_rid",
        "_rid_prefix",
        "_upstream_paused",
        "_waiting",
        "aborting",
        "admitted",
        "client_ip",
        "closed",
        "deadline",
        "draining",
        "flow",
        "log_fields",
        "peer_done",
        "plane",
        "reader",
        "send_deadline",
        "transport",
        "tunnel",
        "write_paused",
        "ws_pending",
    )

    def __init__(self, plane: DataPlane, admitted: Peer, release: Callable[[], None]) -> None:
        self.plane = plane
        self.admitted = admitted
        self._release = release  # gives back the --max-connections slot
        self.transport: asyncio.Transport | None = None
        self.client_ip = b"-"
        self._port = b""
        self.reader = RequestReader(self, plane.cfg)
        self._queue: list[Exchange] = []  # in order; the first is the one being answered
        self._last: Exchange | None = None
        self.flow = ReadGate()
        self._upstream_paused = False
        self._out: list[bytes] = []
        self.deadline = 0.0  # idle, header or body deadline (loop time); 0 = none
        self._waiting = WAIT_IDLE
        self.send_deadline = 0.0  # writing is paused: the client must take a byte by then
        self.log_fields = ""  # the access record's connection part (connection_made)
        # Request IDs: a random prefix per connection and a counter (cheaper than urandom each).
        self._rid_prefix = b""
        self._rid = 0
        self.draining = False
        self.peer_done = False  # the client half-closed (eof_received)
        self.write_paused = False  # the client's transport is above its high-water mark
        self.aborting = False  # the proxy cut the connection (abort)
        self.closed = False
        self.tunnel: Tunnel | None = None  # a WebSocket after the upstream's 101
        self.ws_pending: bytes | None = None  # bytes after an upgrade request, until its answer

    @property
    def peer(self) -> PeerIdentity | None:
        """The client's identity (None: no certificate)."""
        return self.admitted.identity

    # -- connection lifecycle (plane.Connection) ---------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Register the connection and wait for the first request."""
        self.transport = self.flow.transport = t = transport  # type: ignore[assignment]
        plane = self.plane
        self.client_ip, self._port, self.log_fields = connection_facts(plane, self.admitted, t)
        self._rid_prefix = os.urandom(6).hex().encode()
        plane.connections.add(self)
        plane.metrics.connections_open.inc()
        self._wait(WAIT_IDLE)
        if plane.draining:
            self.drain()

    def verified_chain(self) -> list[x509.Certificate] | None:
        """The client's verified chain (admission.Peer.verified_chain)."""
        return self.admitted.verified_chain()

    def cut(self) -> None:
        """The reloaded trust refuses this client: close at once, in-flight requests too."""
        self.closed = True
        self.admitted.sslobj = None  # its session is not kept (connection_lost)
        self.abort()

    def abort(self) -> None:
        """Close without waiting (the drain grace is over, cut, the send timeout)."""
        self.aborting = True
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        """Release everything the connection holds."""
        self.closed = True
        for ex in self._queue:
            ex.abandon()  # decided but never answered: recorded as 499 (nginx's convention)
        self._queue.clear()
        sslobj = self.admitted.sslobj
        if sslobj is not None and self.plane.cfg.tls.sessions == "cache":
            keep_session(sslobj)
        # This object and its parser reference each other, a cycle only the garbage collector
        # frees, and it runs by object counts, not bytes: holding the transport until then kept
        # the TLS state and the read buffer of every closed connection alive, and fragmented
        # the heap (RSS grew about 5 KB per connection under handshake load).
        self.transport = self.flow.transport = None
        self.admitted.sslobj = None
        self.plane.connections.discard(self)
        self.plane.metrics.connections_open.dec()
        self._release()

    def eof_received(self) -> bool:
        """The client half-closed (TCP FIN or TLS close_notify): every request it sent whole is
        still answered, in order, then the connection closes (HAProxy's default; nginx would
        abort them with a 499). An incomplete request can never complete: one not started is
        dropped unanswered (never sent upstream); one in flight ends the connection now, as
        does an idle connection or a WebSocket upgrade awaiting its answer."""
        last, queue = self._last, self._queue
        if last is not None and not last.body_done and last in queue:
            if last is queue[0]:
                return False  # its head and body so far went upstream: connection_lost aborts
            queue.remove(last)
        if not queue or self.ws_pending is not None:
            return False
        self.peer_done = True  # no more requests can come: close after the last answer
        return True

    def drain(self) -> None:
        """Shutdown: close now if idle, else after the response in flight."""
        self.draining = True
        if not self._queue and not self.reader.in_head and self.transport is not None:
            self.transport.close()

    # -- reading (reader.RequestSink) -------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        """Feed the request reader."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        self.reader.feed(data)

    def is_final(self) -> bool:
        """No request may follow: every way the connection closes after an answer passes
        through one of these: an exchange marked close (refusals, Connection: close, HTTP/1.0),
        a drain, or the end."""
        last = self._last
        return (last is not None and last.close) or self.draining or self.closed

    def on_final(self) -> None:
        """The rest of this stream is never read (INT-010)."""
        self.flow.pause("final")

    def on_error(self, error: ProxyError) -> None:
        """Parsing stopped: answer in order, then close (rule 1)."""
        self._reject(error)

    def on_partial_head(self) -> None:
        """A head arriving in pieces gets --header-timeout (when nothing is in flight)."""
        if not self._queue and self._waiting != WAIT_HEAD:
            self._wait(WAIT_HEAD)

    def on_request(
        self,
        method: bytes,
        url: bytes,
        version: str,
        raw: list[tuple[bytes, bytes]],
        upgrade: bool,
        keep_alive: bool,
    ) -> None:
        """Validate and queue the request; start it when it is first in line."""
        cfg = self.plane.cfg
        h2c = cfg.upstream_protocol == "h2c"  # h1toh2.py: every request as an h2c stream
        ex = (H2Exchange if h2c else Exchange)(self, method, url, self._next_id())
        try:
            req = prepare(
                method,
                url,
                version,
                raw,
                upgrade=upgrade and not h2c,  # no WebSocket over h2c: a plain request
                client_ip=self.client_ip,
                block=self.admitted.block,
                default_host=self.plane.upstream_host,
                normalize=bool(self.plane.gen.policy.routes),
                port=self._port,
                underscores=cfg.underscore_headers,
                request_id=ex.request_id,
                trace=cfg.trace_context,
                make=self.plane.trace_make,
            )
        except ProxyError as err:
            ex.fail(err)
            if isinstance(err, UnderscoreHeader):
                self._underscored([n for n, _ in raw if b"_" in n], "rejected")
        else:
            ex.path, ex.head, ex.chunked, ex.ws_key = req.path, req.head, req.chunked, req.ws_key
            ex.request_id, ex.trace, ex.span = req.request_id, req.trace, req.span
            ex.has_body, ex.expect, ex.length = req.has_body, req.expect, req.length
            if req.underscored:
                self._underscored(req.underscored, "dropped")
            ex.http10 = version == "1.0"
            ex.close = not keep_alive
        self._queue.append(ex)
        self._last = ex
        if len(self._queue) == 1:
            self.deadline = 0.0
            ex.begin()
        if ex.has_body and not ex.status and not ex.body_done and cfg.body_timeout:
            # A body that stops arriving holds an upstream connection: --body-timeout (RES-06).
            self._waiting = WAIT_BODY
            self.deadline = self.plane.clock() + cfg.body_timeout

    def _next_id(self) -> bytes:
        self._rid += 1
        return b"%b%04x" % (self._rid_prefix, self._rid)

    def _underscored(self, names: list[bytes], action: str) -> None:
        """Count and log header names with '_' that were not forwarded (INT-005)."""
        dropped = self.plane.metrics.headers_dropped
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

    def on_request_body(self, body: bytes) -> None:
        """Stream a body piece upstream, or hold it until the upstream is ready."""
        ex = self._last
        if ex is None or ex.status:
            return  # already answered (denied or failed): the rest of the body is discarded
        ex.bytes_in += len(body)
        if ex.bytes_in > ex.length and not ex.chunked:
            # Cannot happen while the forwarded Content-Length is the one llhttp frames with;
            # if it ever does, no byte beyond the declared length goes upstream (fail closed).
            logger.error("body longer than its Content-Length", extra={"length": ex.length})
            raise Stop(BadRequest())
        if self._waiting == WAIT_BODY:
            self.deadline = self.plane.clock() + self.plane.cfg.body_timeout
        if ex.send_body(body):
            self.flow.pause("buffer")

    def on_request_end(self) -> None:
        """The request body is complete."""
        ex = self._last
        if ex is None:
            return
        if self._waiting == WAIT_BODY:
            self._waiting, self.deadline = WAIT_IDLE, 0.0
        ex.end_body()
        if len(self._queue) > 1 and self._queue[-1] is ex:
            self.flow.pause("queue")  # pipelined: wait until the earlier response is done (rule 2)

    def _reject(self, err: ProxyError) -> None:
        """A request that cannot be parsed: answer in order, then close (rule 1)."""
        self.reader.in_head = False
        last = self._last
        if last is not None and not last.body_done and not last.status and last in self._queue:
            # The body of an accepted request is malformed: abort that exchange.
            last.body_done = True
            if last is not self._queue[0]:
                last.fail(err)
                self.flow.pause("error")
                return
            if last.upstream is not None:
                last.upstream.close()
                last.upstream = None
            last.close = True
            if last.response_started:
                last.finish(aborted=True)
                return
            last.fail(err)
            self.send_error(last, *last.error)  # type: ignore[misc]  # set by fail()
            last.finish()
            return
        # A head refused before it was complete (400, 414, 431, 408) is an exchange of its own,
        # so that it has what every answered request has: one access record, with the peer and
        # a request id (nginx logs its 400s in the access log), and the request metrics.
        ex = Exchange(self, b"-", self.reader.url or b"-", self._next_id())
        ex.body_done = True
        ex.fail(err)
        self._queue.append(ex)
        if len(self._queue) > 1:
            self.flow.pause("error")  # answered after the requests before it (rule 2)
            return
        ex.begin()

    # -- writing (exchange.Downstream) -------------------------------------------------------
    def is_current(self, ex: Exchange) -> bool:
        """*ex* is the one being answered on an open connection."""
        return not self.closed and bool(self._queue) and self._queue[0] is ex

    def pause_reading(self, reason: str) -> None:
        """exchange.Downstream: stop reading the client."""
        self.flow.pause(reason)

    def resume_reading(self, reason: str) -> None:
        """exchange.Downstream: *reason* no longer holds."""
        self.flow.resume(reason)

    def trim(self) -> None:
        """Idle between requests (the sweeper, deadlines.py): keep nothing of the last request
        that no rule needs. Its exchange goes once its body is read (on_request_body and
        on_request_end then have nothing to feed) unless it ends the connection (is_final);
        the reader drops its parser (reader.py)."""
        last = self._last
        if last is not None and last.body_done and not last.close:
            self._last = None
        self.reader.trim()

    def done(self, ex: Exchange) -> None:
        """*ex* is answered: close, or go on with the next request (rule 2)."""
        if self._queue and self._queue[0] is ex:
            self._queue.pop(0)
        t = self.transport
        if t is None:
            return
        if self.ws_pending is not None and ex.ws_key is not None:
            self._declined(ex)
        if ex.close or self.draining or (self.peer_done and not self._queue):
            t.close()
            return
        self.flow.resume("queue")
        if self._queue:
            # Next pipelined request: from the loop, not recursively (thousands may be queued).
            asyncio.get_running_loop().call_soon(self._start_next)
        else:
            self._wait(WAIT_HEAD if self.reader.in_head else WAIT_IDLE)

    def _start_next(self) -> None:
        # Not while the client takes no bytes (red team F1): the next response would be read
        # from an upstream nobody pauses, into memory, without bound.
        if self._queue and not self._queue[0].started and not self.closed and not self.write_paused:
            self._queue[0].begin()
