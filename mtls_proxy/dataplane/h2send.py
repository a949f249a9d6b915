"""The writing half of the HTTP/2 client connection (h2conn.H2Connection): the Downstream
methods exchanges call, framed as HEADERS, DATA, trailers and RST_STREAM through h2, and each
stream's response bytes waiting for flow-control window.

A mixin, kept apart so that h2conn.py holds the connection's lifecycle and reading side.

Rules:
1. Response bodies are sent as the peer's flow-control windows allow; what does not fit waits
   per stream, and the upstream is paused while more than WINDOW_HOLD bytes wait.
2. Trailers go after the last pending DATA and end the stream; END_STREAM (or RST_STREAM) is
   sent once per stream, whatever order the upstream's events come in.
3. A response that could not be completed resets the stream (INTERNAL_ERROR); a complete one
   while the client still sends asks it to stop without error (RST_STREAM NO_ERROR, RFC 9113
   8.1).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Final

from mtls_proxy.core import grpc
from mtls_proxy.dataplane import h2lib
from mtls_proxy.http1.response import error_response
from mtls_proxy.http2.response import error_headers, h2_headers

if TYPE_CHECKING:
    from mtls_proxy.dataplane.exchange import Exchange
    from mtls_proxy.dataplane.flow import ReadGate
    from mtls_proxy.dataplane.plane import DataPlane
    from mtls_proxy.http1.response import BodyMode, ResponseHead

WINDOW_HOLD: Final = 256 * 1024  # response bytes waiting for window, per stream, before pausing


class H2Stream:
    """One stream's exchange and the response bytes waiting for flow-control window."""

    __slots__ = (
        "blocked",
        "declared",
        "ended",
        "ex",
        "grpc",
        "paused",
        "pending",
        "sent_end",
        "sid",
        "trailers",
    )

    def __init__(self, sid: int, ex: Exchange, is_grpc: bool) -> None:
        self.sid, self.ex, self.grpc = sid, ex, is_grpc
        self.pending: list[bytes] = []
        self.trailers: list[tuple[bytes, bytes]] | None = None  # sent after pending, ending it
        self.sent_end = False  # END_STREAM (or RST_STREAM) is sent: nothing more goes out
        self.declared: int | None = None  # the request's content-length (h2conn rule 7)
        self.blocked = 0.0  # since when response bytes wait for a window that does not open
        self.ended = False  # the response is complete: END_STREAM once pending is sent
        self.paused = False  # the upstream is paused for this stream (rule 2)


class H2Writer:
    """The Downstream methods of an HTTP/2 connection (the connection's own attributes)."""

    plane: DataPlane
    transport: asyncio.Transport | None
    flow: ReadGate
    h2: h2lib.connection.H2Connection
    closed: bool
    draining: bool
    deadline: float
    _streams: dict[int, H2Stream]
    _by_ex: dict[Exchange, H2Stream]
    _flush_due: bool

    def _live(self, ex: Exchange) -> H2Stream | None:
        """*ex*'s stream while the connection can still send (after our GOAWAY h2 cannot)."""
        return None if self.closed else self._by_ex.get(ex)

    def is_current(self, ex: Exchange) -> bool:
        """*ex*'s stream is open on an open connection."""
        return not self.closed and ex in self._by_ex

    def send_continue(self, ex: Exchange) -> None:
        """Nothing: an HTTP/2 client sends its body without waiting for 100."""

    def send_head(self, ex: Exchange, head: ResponseHead, mode: BodyMode, length: int) -> None:
        """The response HEADERS (http2.response)."""
        st = self._live(ex)
        if st is None:
            return
        self._headers(st, h2_headers(head, mode, length), False)

    def send_data(self, ex: Exchange, data: bytes) -> None:
        """A body piece, as the windows allow (rule 2)."""
        st = self._live(ex)
        if st is None or not data:
            return
        st.pending.append(data)
        self._send_pending(st.sid)
        if st.pending and not st.paused and sum(map(len, st.pending)) > WINDOW_HOLD:
            st.paused = ex.pause_upstream()

    def send_end(self, ex: Exchange) -> None:
        """END_STREAM once the pending body is sent."""
        st = self._live(ex)
        if st is None:
            return
        st.ended = True
        self._send_pending(st.sid)

    def send_error(self, ex: Exchange, status: int, error: str, message: str) -> None:
        """A refusal: trailers-only for gRPC (core/grpc.py), else the JSON error."""
        st = self._live(ex)
        if st is None:
            return
        if st.grpc:
            self._headers(st, grpc.trailers_only(status, message), True)
            return
        body = error_response(status, error, message, False, False).partition(b"\r\n\r\n")[2]
        if ex.is_head:
            self._headers(st, error_headers(status, len(body)), True)
            return
        if not self._headers(st, error_headers(status, len(body)), False):
            return
        st.pending.append(body)
        st.ended = True
        self._send_pending(st.sid)

    def send_switch(self, ex: Exchange, head: ResponseHead) -> None:
        """Never called: an HTTP/2 request is never an upgrade (prepare(upgrade=False))."""
        raise AssertionError("no protocol switch over HTTP/2")

    def send_h2_head(
        self, ex: Exchange, headers: list[tuple[bytes, bytes]], end_stream: bool
    ) -> bool:
        """An HTTP/2 upstream's response HEADERS, as they are (h2 checked them)."""
        st = self._live(ex)
        if st is None:
            return True  # the stream is gone: nothing to send, nothing wrong with the head
        self._headers(st, headers, end_stream)
        return True

    def _headers(self, st: H2Stream, headers: list[tuple[bytes, bytes]], end: bool) -> bool:
        """HEADERS on *st*; False when the stream is gone meanwhile (the client reset it in the
        same read that opened it): the stream is forgotten, nothing raises into the loop."""
        try:
            self.h2.send_headers(st.sid, headers, end_stream=end)
        except h2lib.exceptions.ProtocolError:
            st.ended = st.sent_end = True
            self._forget(st)
            return False
        if end:
            st.ended = st.sent_end = True
        return True

    def send_trailers(self, ex: Exchange, headers: list[tuple[bytes, bytes]]) -> None:
        """Trailers: they end the stream once the pending body is sent."""
        st = self._live(ex)
        if st is None:
            return
        st.trailers = headers
        st.ended = True
        self._send_pending(st.sid)

    def send_reset(self, ex: Exchange, code: int) -> None:
        """Reset *ex*'s stream (the upstream reset or cancelled its side)."""
        st = self._live(ex)
        if st is None:
            return
        st.ended = st.sent_end = True
        st.pending.clear()
        with contextlib.suppress(h2lib.exceptions.ProtocolError):
            self.h2.reset_stream(st.sid, code)
        self._forget(st)

    def ack(self, ex: Exchange, n: int) -> None:
        """*n* request body bytes of *ex* were handed on: the client may send more."""
        st = self._live(ex)
        if st is not None and not self.closed:
            self.h2.acknowledge_received_data(n, st.sid)
            if not self._flush_due:  # one write for the WINDOW_UPDATEs of this loop turn
                self._flush_due = True
                asyncio.get_running_loop().call_soon(self._flush_later)

    def _flush_later(self) -> None:
        self._flush_due = False
        self.flush()

    def flush(self) -> None:
        """Write what h2 has queued, in one TLS write."""
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def pause_reading(self, reason: str) -> None:
        """Stop reading the client (the whole connection: one upstream is slow)."""
        self.flow.pause(reason)

    def resume_reading(self, reason: str) -> None:
        """*reason* no longer holds."""
        self.flow.resume(reason)

    def done(self, ex: Exchange) -> None:
        """*ex* is over: its stream leaves once its pending bytes are sent. A response that could
        not be completed (the upstream failed inside the body) resets the stream; a complete one
        while the client still sends asks it to stop, without error (RFC 9113 8.1)."""
        st = self._live(ex)
        if st is not None and not st.ended:
            with contextlib.suppress(h2lib.exceptions.ProtocolError):
                self.h2.reset_stream(st.sid, h2lib.errors.ErrorCodes.INTERNAL_ERROR)
            self._forget(st)
        elif st is not None and not st.pending:
            if st.sent_end and not ex.body_done:
                with contextlib.suppress(h2lib.exceptions.ProtocolError):
                    self.h2.reset_stream(st.sid, h2lib.errors.ErrorCodes.NO_ERROR)
            self._forget(st)
        self.flush()

    # -- internals ------------------------------------------------------------------------------
    def _send_pending(self, sid: int) -> None:
        st = self._streams.get(sid)
        if st is None:
            if sid == 0:  # the connection window grew: every stream may go on
                for other in list(self._streams.values()):
                    self._send_pending(other.sid)
            return
        h2c = self.h2
        sent = 0
        try:
            while st.pending:
                window = min(h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = st.pending[0]
                if len(chunk) > window:
                    st.pending[0] = chunk[window:]
                    chunk = chunk[:window]
                else:
                    st.pending.pop(0)
                h2c.send_data(sid, chunk)
                sent += len(chunk)
            if st.pending:  # h2conn rule 4: a window that stays shut is a client not reading
                st.blocked = self.plane.clock() if sent or not st.blocked else st.blocked
            else:
                st.blocked = 0.0
                if st.ended and st.trailers is not None:
                    h2c.send_headers(sid, st.trailers, end_stream=True)
                    st.trailers, st.sent_end = None, True
                    if st.ex not in self._by_ex or st.ex.status:
                        self._forget(st)
                elif st.ended:
                    if not st.sent_end:
                        st.sent_end = True
                        h2c.end_stream(sid)
                    if st.ex not in self._by_ex or st.ex.status:
                        self._forget(st)
                if st.paused:
                    st.paused = False
                    st.ex.resume_upstream(False)
        except h2lib.exceptions.ProtocolError:  # the stream closed meanwhile
            self._forget(st)

    def _forget(self, st: H2Stream) -> None:
        if self._streams.get(st.sid) is st:
            del self._streams[st.sid]
            self._by_ex.pop(st.ex, None)
        if not self._streams:
            if self.draining and self.transport is not None:
                self.flush()
                self.transport.close()
            else:
                self.deadline = self.plane.clock() + self.plane.cfg.idle_timeout
