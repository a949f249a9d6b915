"""HTTP/2 to the upstream in cleartext with prior knowledge (h2c, RFC 9113 3.3): what a gRPC
server (grpcio speaks only HTTP/2) needs, with `--upstream-protocol h2c|auto`.

One `H2Upstream` connection carries many streams, each the upstream half of an `H2Exchange`
(h2exchange.py); the pool opens another connection only when the open ones are at the
upstream's SETTINGS_MAX_CONCURRENT_STREAMS or going away.

Rules:
1. Request DATA is sent as the upstream's windows allow; what does not fit waits per stream,
   and the exchange acknowledges the client's bytes only as they leave (`on_request_sent`), so
   the client's own HTTP/2 window is the back-pressure, per stream, with no buffer of ours
   beyond one window.
2. Response DATA is acknowledged to the upstream as it is handed to the client, except while
   the exchange holds the stream (its client reads slowly): then the stream's acknowledgements
   wait and its window closes; the connection's window is opened at once (shared by every
   client's streams, it must not close because of one).
3. GOAWAY from the upstream: streams above its last-stream-id were never processed and fail
   (502, UNAVAILABLE for gRPC); the others finish; the connection takes no new stream. The
   frame is taken out before h2 reads it (http2/goaway.py): h2 would refuse the finishing
   streams' frames after it.
4. A lost connection fails every stream on it (before the response head: 502; after: reset).
5. What one read from the upstream produced is flushed to each client it concerns at the end
   of that read: a streamed response moves as it comes, not when the call ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Final, Protocol

from mtls_proxy.core.errors import UpstreamTimeout, UpstreamUnavailable
from mtls_proxy.dataplane import h2lib
from mtls_proxy.http2.goaway import GoAwayTap

if TYPE_CHECKING:
    from mtls_proxy.core.addresses import Upstream

STREAM_WINDOW: Final = 1024 * 1024  # our receive window per upstream stream (rule 2)
CONNECTION_WINDOW: Final = 16 * 1024 * 1024
_OPEN_WINDOW_STEP: Final = CONNECTION_WINDOW - 65535


class StreamSink(Protocol):
    """The exchange behind one upstream stream (h2exchange.H2Exchange)."""

    def on_request_sent(self, n: int) -> None:
        """*n* request body bytes left for the upstream (rule 1)."""

    def on_h2_head(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        """The response HEADERS."""

    def on_response_body(self, data: bytes) -> None:
        """A response DATA payload."""

    def on_h2_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        """The response trailers (END_STREAM)."""

    def on_h2_end(self) -> None:
        """The response is complete."""

    def on_h2_reset(self, code: int) -> None:
        """The upstream reset the stream (or never processed it, or the connection is lost)."""

    def flush(self) -> None:
        """Write what this upstream read produced for the client."""


class H2Upstream(asyncio.Protocol):
    """One h2c client connection to the upstream."""

    def __init__(self, pool: H2UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.usable = True  # may take new streams (rule 3)
        self.sinks: dict[int, StreamSink] = {}
        self._pending: dict[int, list[bytes]] = {}
        self._ending: set[int] = set()
        self._held: dict[int, int] = {}  # stream -> response bytes not yet acknowledged
        self._flush_due = False
        self._tap = GoAwayTap()  # rule 3: h2 would close on a GOAWAY and cut the streams
        # Our request blocks are built valid (h2exchange.h2_request_headers marks the secrets
        # never-indexed itself); the upstream's responses are checked by h2.
        config = h2lib.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2lib.connection.H2Connection(config=config)

    def has_room(self) -> bool:
        """Whether a new stream fits (rule 3, and the upstream's concurrency limit)."""
        # len(sinks), not h2's open_outbound_streams: that walks every stream it knows, on
        # every request (3 % of a gRPC call's CPU in the bench profile).
        return (
            self.usable
            and self.transport is not None
            and len(self.sinks) < self.h2.remote_settings.max_concurrent_streams
        )

    # -- asyncio ----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The connection preface, our SETTINGS and a connection window of CONNECTION_WINDOW."""
        self.transport = transport  # type: ignore[assignment]
        h2c = self.h2
        h2c.local_settings = h2lib.settings.Settings(
            client=True,
            initial_values={
                h2lib.settings.SettingCodes.ENABLE_PUSH: 0,
                h2lib.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2lib.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.pool.max_header_list,
            },
        )
        h2c.initiate_connection()
        h2c.increment_flow_control_window(_OPEN_WINDOW_STEP)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        """Rule 4."""
        self.transport = None
        self.usable = False
        self.pool.discard(self)
        sinks, self.sinks = self.sinks, {}
        for sink in sinks.values():
            sink.on_h2_reset(-1)

    def data_received(self, data: bytes) -> None:
        """Feed h2 (without GOAWAYs: rule 3); hand each event to its stream's exchange."""
        data, goaways = self._tap.feed(data)
        for last, _code in goaways:
            self._goaway(last)
        try:
            events = self.h2.receive_data(data)
        except h2lib.exceptions.ProtocolError:
            self.flush()
            self.close()
            return
        touched: set[StreamSink] = set()
        for ev in events:
            sid = getattr(ev, "stream_id", 0)
            sink = self.sinks.get(sid) if sid else None
            if sink is not None:
                touched.add(sink)
            if isinstance(ev, h2lib.events.ResponseReceived) and sink is not None:
                sink.on_h2_head(list(ev.headers or ()), ev.stream_ended is not None)
            elif isinstance(ev, h2lib.events.DataReceived):
                self._on_data(sid, sink, ev)
            elif isinstance(ev, h2lib.events.TrailersReceived) and sink is not None:
                sink.on_h2_trailers(list(ev.headers or ()))
            elif isinstance(ev, h2lib.events.StreamEnded) and sink is not None:
                self._drop(sid)
                sink.on_h2_end()
            elif isinstance(ev, h2lib.events.StreamReset) and sink is not None:
                self._drop(sid)
                sink.on_h2_reset(int(ev.error_code or 0))
            elif isinstance(ev, h2lib.events.WindowUpdated):
                self._window(sid)
            elif isinstance(ev, h2lib.events.ConnectionTerminated):  # never, after the tap
                self._goaway(ev.last_stream_id or 0)
        self.flush()
        for sink in touched:  # rule 5: what this read produced goes to the clients now
            sink.flush()
        if not self.usable and not self.sinks:
            self.close()

    # -- streams ----------------------------------------------------------------------------------
    def open(self, sink: StreamSink, headers: list[tuple[bytes, bytes]], end_stream: bool) -> int:
        """A new stream for *sink*: its HEADERS now; returns the stream id."""
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, headers, end_stream=end_stream)
        self.sinks[sid] = sink
        self.flush_soon()
        return sid

    def send(self, sid: int, data: bytes, end: bool) -> None:
        """Request body bytes (and/or the end of the body) for stream *sid* (rule 1)."""
        if sid not in self.sinks:
            return
        if data:
            self._pending.setdefault(sid, []).append(data)
        if end:
            self._ending.add(sid)
        self._send_pending(sid)
        self.flush_soon()

    def reset(self, sid: int, code: int = h2lib.errors.ErrorCodes.CANCEL) -> None:
        """Abandon stream *sid* (the client left, reset it, or the deadline passed)."""
        if self.sinks.pop(sid, None) is None:
            return
        self._drop(sid)
        with contextlib.suppress(h2lib.exceptions.ProtocolError):
            self.h2.reset_stream(sid, code)
        self.flush_soon()

    def backlog(self, sid: int) -> int:
        """Request bytes of stream *sid* waiting for the upstream's window."""
        return sum(map(len, self._pending.get(sid, ())))

    def hold(self, sid: int) -> None:
        """Stop acknowledging stream *sid*'s response bytes (rule 2)."""
        self._held.setdefault(sid, 0)

    def release(self, sid: int) -> None:
        """Acknowledge what was held: the upstream may send again."""
        n = self._held.pop(sid, 0)
        if n and sid in self.sinks:
            with contextlib.suppress(h2lib.exceptions.ProtocolError):
                self.h2.increment_flow_control_window(n, stream_id=sid)  # the stream's only
            self.flush_soon()

    def flush_soon(self) -> None:
        """Write at the end of this loop turn: a call's HEADERS and DATA go in one write."""
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush_later)

    def _flush_later(self) -> None:
        self._flush_due = False
        self.flush()

    def flush(self) -> None:
        """Write what h2 has queued."""
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        """Close the connection (its streams fail in connection_lost)."""
        self.usable = False
        if self.transport is not None:
            self.transport.close()

    # -- internals --------------------------------------------------------------------------------
    def _on_data(self, sid: int, sink: StreamSink | None, ev: h2lib.events.DataReceived) -> None:
        n = ev.flow_controlled_length or 0
        if sink is not None and ev.data:
            sink.on_response_body(ev.data)
        if not n:
            return
        if sink is not None and sid in self._held:
            # Rule 2: only the stream's window waits; the connection's is shared by every
            # client's streams and opens at once, or one slow reader would stall them all.
            self._held[sid] += n
            self.h2.increment_flow_control_window(n)
        else:
            self.h2.acknowledge_received_data(n, sid)

    def _window(self, sid: int) -> None:
        for s in list(self._pending) if sid == 0 else [sid]:
            self._send_pending(s)

    def _send_pending(self, sid: int) -> None:
        h2c, pending = self.h2, self._pending.get(sid)
        sent = 0
        try:
            while pending:
                window = min(h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = pending[0]
                if len(chunk) > window:
                    pending[0], chunk = chunk[window:], chunk[:window]
                else:
                    pending.pop(0)
                h2c.send_data(sid, chunk)
                sent += len(chunk)
            if not pending and sid in self._ending:
                self._ending.discard(sid)
                self._pending.pop(sid, None)
                h2c.end_stream(sid)
        except h2lib.exceptions.StreamClosedError:
            self._pending.pop(sid, None)
            self._ending.discard(sid)
        sink = self.sinks.get(sid)
        if sent and sink is not None:
            sink.on_request_sent(sent)

    def _drop(self, sid: int) -> None:
        self.sinks.pop(sid, None)
        self._pending.pop(sid, None)
        self._ending.discard(sid)
        self._held.pop(sid, None)

    def _goaway(self, last: int) -> None:
        """Rule 3."""
        self.usable = False
        self.pool.discard(self)
        for sid in [s for s in self.sinks if s > last]:
            sink = self.sinks[sid]
            self._drop(sid)
            sink.on_h2_reset(h2lib.errors.ErrorCodes.REFUSED_STREAM)


class H2UpstreamPool:
    """The h2c connections to one upstream (usually one, multiplexed)."""

    def __init__(self, upstream: Upstream, connect_timeout: float, max_header_list: int) -> None:
        self.upstream = upstream
        self.connect_timeout = connect_timeout
        self.max_header_list = max_header_list
        self.conns: list[H2Upstream] = []
        self._connecting: asyncio.Task[H2Upstream] | None = None

    def take(self) -> H2Upstream | None:
        """An open connection with room for a stream, or None."""
        for conn in self.conns:
            if conn.has_room():
                return conn
        return None

    async def get(self) -> H2Upstream:
        """An open connection with room, connecting (once, for every waiter) if needed."""
        conn = self.take()
        if conn is not None:
            return conn
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> H2Upstream:
        loop = asyncio.get_running_loop()
        u = self.upstream
        try:
            async with asyncio.timeout(self.connect_timeout):
                if u.scheme == "unix":
                    _, proto = await loop.create_unix_connection(lambda: H2Upstream(self), u.path)
                else:
                    _, proto = await loop.create_connection(
                        lambda: H2Upstream(self), u.host, u.port
                    )
        except TimeoutError:
            raise UpstreamTimeout from None
        except OSError as exc:
            raise UpstreamUnavailable from exc
        self.conns.append(proto)
        return proto

    def discard(self, conn: H2Upstream) -> None:
        """Forget a connection that is going away."""
        with contextlib.suppress(ValueError):
            self.conns.remove(conn)

    def close(self) -> None:
        """Close every connection (shutdown)."""
        for conn in list(self.conns):
            conn.close()
