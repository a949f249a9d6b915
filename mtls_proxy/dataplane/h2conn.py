"""The HTTP/2 client protocol (--http2 on, ALPN h2): one asyncio.Protocol per client connection,
the python-hyper `h2` state machine inside, one `Exchange` per stream.

Like connection.Http1Connection, this is a thin adapter: HPACK, frames, stream states and flow
control windows are h2's; each request's header block is checked by http2.request (RFC 9113)
and then by the HTTP/1.1 rules (http1.request.prepare), so stripping and identity injection are
one set of rules for both protocols; the exchange decides, forwards to the HTTP/1.1 upstream and
accounts, exactly as for HTTP/1.1.

Rules:
1. A malformed header block is a 400 on that stream (the JSON error); a protocol error of the
   connection (h2 raises it) is GOAWAY and the end of the connection.
2. Responses are written by the H2Writer mixin (h2send.py: flow control, trailers, resets).
3. Request bodies are acknowledged (WINDOW_UPDATE) as they are handed to the upstream side, so
   the client can never have more than the stream window in flight per stream.
4. Timeouts are the listener sweeper's: --idle-timeout with no stream open, --send-timeout
   while the client does not read (the connection) or keeps a stream's window shut with
   response bytes waiting (that stream is reset), the exchanges' upstream deadline; a drain
   sends GOAWAY and closes once the open streams are answered.
5. The attack classes (http2/guard.py: CONTINUATION, Rapid Reset, MadeYouReset, floods) end the
   connection with GOAWAY(ENHANCE_YOUR_CALM); every GOAWAY is counted by reason. After our
   GOAWAY nothing more is sent (h2 is CLOSED): the exchanges still running find their stream
   gone.
6. A client's GOAWAY is read before h2 sees it (http2/goaway.py): its open streams are answered,
   then the connection closes.
7. A request that declared a content-length ends with exactly that many DATA bytes: h2 checks
   DATA frames only, so a body cut short by trailers would reach an HTTP/1.1 upstream framed
   for bytes that never come (the next request's head would be read as this body: smuggling).
   Short, it is reset (PROTOCOL_ERROR) and its upstream connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import TYPE_CHECKING

from hyperframe.frame import GoAwayFrame

from mtls_proxy.core import grpc
from mtls_proxy.core.errors import ProxyError
from mtls_proxy.dataplane import h2lib
from mtls_proxy.dataplane.admission import connection_facts
from mtls_proxy.dataplane.exchange import Exchange
from mtls_proxy.dataplane.flow import ReadGate
from mtls_proxy.dataplane.h2exchange import H2Exchange
from mtls_proxy.dataplane.h2send import H2Stream, H2Writer
from mtls_proxy.http1.request import prepare
from mtls_proxy.http2.goaway import GoAwayTap
from mtls_proxy.http2.guard import PREFACE, FrameGuard
from mtls_proxy.http2.request import MalformedH2Request, translate

if TYPE_CHECKING:
    from collections.abc import Callable

    from cryptography import x509

    from mtls_proxy.core.identity import PeerIdentity
    from mtls_proxy.dataplane.admission import Peer
    from mtls_proxy.dataplane.plane import DataPlane

logger = logging.getLogger("mtls_proxy.proxy")


class H2Connection(H2Writer, asyncio.Protocol):
    """A client connection speaking HTTP/2 (plane.Connection, exchange.Downstream)."""

    protocol = "h2"  # the metrics' and access log's protocol label

    def __init__(self, plane: DataPlane, admitted: Peer, release: Callable[[], None]) -> None:
        self.plane, self.admitted, self._release = plane, admitted, release
        self.transport: asyncio.Transport | None = None
        self.client_ip = b"-"
        self._port = b""
        self.flow = ReadGate()
        self.log_fields = ""
        self.closed = self.draining = self.aborting = False
        self.deadline = 0.0
        self.send_deadline = 0.0  # writing is paused: the client must take a byte by then
        cfg = plane.cfg
        self.guard = FrameGuard(cfg.h2_max_header_list_bytes, cfg.h2_reset_budget)
        self._tap = GoAwayTap(len(PREFACE))  # rule 6
        self._rid_prefix = os.urandom(6).hex().encode()
        self._rid = 0
        self._streams: dict[int, H2Stream] = {}
        self._by_ex: dict[Exchange, H2Stream] = {}
        self.h2pool = plane.h2pool
        self._flush_due = False
        # http2.request checks every request header block itself (stricter, and answering 400
        # where h2 would end the connection); what we send is built valid: h2's own checks
        # would only repeat the work (12 % of a request's CPU in the bench profile).
        config = h2lib.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2lib.connection.H2Connection(config=config)

    @property
    def peer(self) -> PeerIdentity | None:
        """The client's identity (None: no certificate)."""
        return self.admitted.identity

    # -- lifecycle (plane.Connection) -----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send our SETTINGS and wait for the client's preface."""
        self.transport = self.flow.transport = t = transport  # type: ignore[assignment]
        plane = self.plane
        self.client_ip, self._port, self.log_fields = connection_facts(plane, self.admitted, t)
        cfg = plane.cfg
        self.h2.local_settings = h2lib.settings.Settings(
            client=False,
            initial_values={
                h2lib.settings.SettingCodes.MAX_CONCURRENT_STREAMS: cfg.h2_max_concurrent_streams,
                h2lib.settings.SettingCodes.INITIAL_WINDOW_SIZE: cfg.h2_initial_stream_window,
                h2lib.settings.SettingCodes.MAX_HEADER_LIST_SIZE: cfg.h2_max_header_list_bytes,
                h2lib.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.h2.initiate_connection()
        if cfg.h2_initial_connection_window > 65535:
            self.h2.increment_flow_control_window(cfg.h2_initial_connection_window - 65535)
        self.flush()
        plane.connections.add(self)
        plane.metrics.connections_open.inc()
        self.deadline = plane.clock() + plane.cfg.idle_timeout
        if plane.draining:
            self.drain()

    def verified_chain(self) -> list[x509.Certificate] | None:
        """The client's verified chain (admission.Peer.verified_chain)."""
        return self.admitted.verified_chain()

    def cut(self) -> None:
        """The reloaded trust refuses this client: close at once."""
        self.closed = True
        self.admitted.sslobj = None
        self.abort()

    def abort(self) -> None:
        """Close without waiting."""
        self.aborting = True
        if self.transport is not None:
            self.transport.abort()

    def drain(self, reason: str = "shutdown") -> None:
        """GOAWAY now (shutdown, or the connection's last stream); close once the open streams
        are answered (rule 4)."""
        self.draining = True
        if self.transport is None:
            return
        self.plane.metrics.h2_goaways.labels(reason=reason).inc()
        # Written here, not with h2's close_connection(): that moves h2 to CLOSED, where it
        # refuses to send the open streams' DATA (and to refuse new streams), so no stream
        # could finish. The frame is all a graceful GOAWAY is (RFC 9113 6.8).
        self.flush()
        goaway = GoAwayFrame(0)
        goaway.last_stream_id = self.h2.highest_inbound_stream_id
        self.transport.write(goaway.serialize())  # error code 0: NO_ERROR
        if not self._streams:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        """Release everything the connection holds."""
        self.closed = True
        for st in list(self._streams.values()):
            if not st.ended:  # answered ones were recorded already
                st.ex.abandon()
        self._streams.clear()
        self._by_ex.clear()
        self.transport = self.flow.transport = None
        self.admitted.sslobj = None
        self.plane.connections.discard(self)
        self.plane.metrics.connections_open.dec()
        self._release()

    def check_deadlines(self, now: float) -> None:
        """Called by the sweeper: the idle timeout, the send timeout and each exchange's
        upstream deadline."""
        if self.send_deadline and now >= self.send_deadline:
            self.abort()  # the client stopped reading: nothing more can be said to it
            return
        send_timeout = self.plane.cfg.send_timeout
        for st in list(self._streams.values()):
            if st.blocked and now - st.blocked >= send_timeout:
                # Rule 4: response bytes wait for a window the client never opens.
                with contextlib.suppress(h2lib.exceptions.ProtocolError):
                    self.h2.reset_stream(st.sid, h2lib.errors.ErrorCodes.CANCEL)
                self._reset(st.sid)
                self.proxy_reset()
                self.flush()
                continue
            ex = st.ex
            if ex.up_deadline and now >= ex.up_deadline:
                ex.up_deadline = 0.0
                ex.on_upstream_timeout()
        if self.deadline and now >= self.deadline and not self._streams:
            self.deadline = 0.0
            self.goaway(h2lib.errors.ErrorCodes.NO_ERROR, "idle")

    def goaway(self, code: int, reason: str) -> None:
        """GOAWAY with *code*, counted by *reason*, and close (rule 5)."""
        self.plane.metrics.h2_goaways.labels(reason=reason).inc()
        if self.transport is None:
            return
        self.closed = True  # h2 will be CLOSED: the exchanges' sends find their streams gone
        if code == h2lib.errors.ErrorCodes.ENHANCE_YOUR_CALM:
            logger.warning("HTTP/2 client over a limit", extra={"error": reason})
        with contextlib.suppress(h2lib.exceptions.ProtocolError):
            self.h2.close_connection(error_code=code)
        self.flush()
        self.transport.close()

    def pause_writing(self) -> None:
        """The client reads slowly: stop reading it (what it sends may need an answer: PING,
        SETTINGS), and give it --send-timeout to take a byte."""
        self.flow.pause("send")
        self.send_deadline = self.plane.clock() + self.plane.cfg.send_timeout

    def resume_writing(self) -> None:
        """The client caught up."""
        self.send_deadline = 0.0
        self.flow.resume("send")

    def _gone(self) -> bool:
        """The connection was closed while a batch of events is handled (a method: mypy would
        take `closed` as still False from the check before the loop)."""
        return self.closed

    def proxy_reset(self) -> None:
        """A stream the proxy ends because of the client: the reset budget counts it too."""
        if self.closed:
            return
        self.plane.metrics.h2_resets.labels(by="proxy").inc()
        over = self.guard.reset(self.plane.clock())
        if over is not None:
            self.goaway(h2lib.errors.ErrorCodes.ENHANCE_YOUR_CALM, over)

    # -- reading ------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        """Feed h2 and act on its events (rule 1)."""
        if self.closed or self.transport is None:
            return
        over = self.guard.feed(data, self.plane.clock())
        if over is not None:
            self.goaway(h2lib.errors.ErrorCodes.ENHANCE_YOUR_CALM, over)
            return
        data, goaways = self._tap.feed(data)
        if goaways and not self.draining:  # rule 6: it opens no more streams; ours finish
            self.draining = True
            if not self._streams:
                self.transport.close()
                return
        try:
            events = self.h2.receive_data(data)
        except h2lib.exceptions.ProtocolError as exc:
            logger.info("HTTP/2 protocol error", extra={"error": type(exc).__name__})
            self.plane.metrics.h2_goaways.labels(reason="protocol_error").inc()
            self.flush()  # h2 queued the GOAWAY
            self.closed = True  # rule 5
            self.transport.close()
            return
        for ev in events:
            if self._gone():  # our GOAWAY (a budget): the rest of the batch is not acted on
                return
            if isinstance(ev, h2lib.events.RequestReceived):
                self._request(ev)
            elif isinstance(ev, h2lib.events.DataReceived):
                self._data(ev)
            elif isinstance(ev, h2lib.events.StreamEnded):
                self._ended(ev.stream_id)
            elif isinstance(ev, h2lib.events.StreamReset):
                if ev.remote_reset:
                    self.plane.metrics.h2_resets.labels(by="client").inc()
                else:  # h2 reset it because of the client (MadeYouReset's currency)
                    self.proxy_reset()
                self._reset(ev.stream_id)
            elif isinstance(ev, h2lib.events.WindowUpdated | h2lib.events.RemoteSettingsChanged):
                self._send_pending(getattr(ev, "stream_id", 0))  # a new initial window too
            elif isinstance(ev, h2lib.events.ConnectionTerminated):  # not after the tap
                self.flush()
                self.closed = True
                self.transport.close()
                return
        self.flush()

    def _request(self, ev: h2lib.events.RequestReceived) -> None:
        sid = ev.stream_id
        if self.draining:  # after our GOAWAY: never processed, the client may retry it
            with contextlib.suppress(h2lib.exceptions.ProtocolError):
                self.h2.reset_stream(sid, h2lib.errors.ErrorCodes.REFUSED_STREAM)
            return
        headers = ev.headers or []  # bytes already (header_encoding=None): no copy
        end_stream = ev.stream_ended is not None
        self._rid += 1
        rid = b"%b%04x" % (self._rid_prefix, self._rid)
        try:
            req = translate(headers, end_stream)
        except ProxyError as err:
            ct = next((v for n, v in headers if n == b"content-type"), None)
            self._start(sid, self._refused(err, b"-", b"-", rid), grpc.is_grpc(ct), end_stream)
            self.proxy_reset()  # a malformed stream, answered: MadeYouReset's currency
            return
        is_grpc = grpc.is_grpc(req.content_type)
        try:
            prep = prepare(
                req.method,
                req.path,
                "1.1",
                req.raw,
                upgrade=False,
                client_ip=self.client_ip,
                block=self.admitted.block,
                default_host=self.plane.upstream_host,
                normalize=bool(self.plane.gen.policy.routes),
                port=self._port,
                underscores=self.plane.cfg.underscore_headers,
                request_id=rid,
                trace=self.plane.cfg.trace_context,
                make=self.plane.trace_make,
            )
        except ProxyError as err:
            self._start(sid, self._refused(err, req.method, req.path, rid), is_grpc, end_stream)
            return
        ex: Exchange
        if is_grpc or self.plane.cfg.upstream_protocol == "h2c":
            ex = hx = H2Exchange(self, req.method, req.path, prep.request_id, is_grpc)
            hx.te_trailers = req.te_trailers
            hx.grpc_timeout = next((v for n, v in req.raw if n == b"grpc-timeout"), None)
        else:
            ex = Exchange(self, req.method, req.path, prep.request_id)
            ex.chunked = prep.chunked
        ex.path, ex.head, ex.trace, ex.span = prep.path, prep.head, prep.trace, prep.span
        ex.has_body, ex.length = prep.has_body, prep.length
        self._start(sid, ex, is_grpc, end_stream)
        st = self._streams.get(sid)
        if st is not None and prep.has_body and not prep.chunked:
            st.declared = prep.length  # rule 7: checked when the stream ends

    def _refused(self, err: ProxyError, method: bytes, path: bytes, rid: bytes) -> Exchange:
        ex = Exchange(self, method, path, rid)
        ex.fail(err)
        if isinstance(err, MalformedH2Request):
            ex.reason = f"{err.public_message}: {err.detail}"
        return ex

    def _start(self, sid: int, ex: Exchange, is_grpc: bool, end_stream: bool) -> None:
        ex.body_done = end_stream
        st = H2Stream(sid, ex, is_grpc)
        self._streams[sid] = st
        self._by_ex[ex] = st
        self.deadline = 0.0
        ex.begin()
        # _rid counts the streams opened: --h2-connection-max-streams
        if self._rid >= self.plane.cfg.h2_connection_max_streams and not self.draining:
            self.drain("max_streams")  # this connection's last stream: GOAWAY names it

    def _data(self, ev: h2lib.events.DataReceived) -> None:
        st = self._streams.get(ev.stream_id)
        data = ev.data or b""
        n = ev.flow_controlled_length or 0
        ex = st.ex if st is not None else None
        if isinstance(ex, H2Exchange) and ex.accepts_body():
            # h2upstream rule 1: the data bytes are acknowledged as they leave for the
            # upstream; padding at once.
            if n > len(data):
                self.h2.acknowledge_received_data(n - len(data), ev.stream_id)
            ex.bytes_in += len(data)
            # END_STREAM rides on the last DATA frame upstream, not on an empty one after it.
            ex.send_body(data, end=ev.stream_ended is not None)
            return
        # Rule 3: acknowledged as handed on (or dropped, for an answered stream).
        if n:
            self.h2.acknowledge_received_data(n, ev.stream_id)
        if ex is None:
            return
        ex.bytes_in += len(data)  # also when answered: rule 7 compares it
        if ex.status:
            return
        if data and ex.send_body(data):
            self.flow.pause("buffer")

    def _ended(self, sid: int) -> None:
        """The request body is complete: as long as it said (rule 7), or the stream is refused."""
        st = self._streams.get(sid)
        if st is None:
            return
        if st.declared is not None and st.ex.bytes_in != st.declared:
            with contextlib.suppress(h2lib.exceptions.ProtocolError):
                self.h2.reset_stream(sid, h2lib.errors.ErrorCodes.PROTOCOL_ERROR)
            self.proxy_reset()
            self._reset(sid)  # the upstream got a length it will not get: it is not reused
            return
        st.ex.end_body()

    def _reset(self, sid: int) -> None:
        st = self._streams.pop(sid, None)
        if st is not None:
            self._by_ex.pop(st.ex, None)
            if not st.ended:  # an answered exchange was recorded: once (F7)
                st.ex.status = st.ex.status or 499
                st.ex.abandon()
