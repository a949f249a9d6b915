"""Upstream side of the data plane: a keep-alive connection pool, and the shell that feeds each
connection's reads to framing.py's strict response parser and its events to the client side.

Rules:
1. The response is re-framed, never spliced: the parser hands the sink a filtered head and the
   decoded body; the client side writes its own framing.
2. Anything odd closes the upstream connection instead of reusing it: unsolicited bytes, body bytes
   on HEAD/204/304, a body shorter than declared, HTTP/1.0 responses (docs/security.md,
   UPS-006/007).
3. A malformed head is a 502; a framing error after the head was sent aborts the client connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import TYPE_CHECKING, Protocol

from mtls_proxy.core.config import Upstream
from mtls_proxy.core.errors import ProxyError, UpstreamTimeout, UpstreamUnavailable
from mtls_proxy.http1.framing import MAX_RESPONSE_HEAD as MAX_RESPONSE_HEAD  # re-exported
from mtls_proxy.http1.framing import EndOfMessage, Event, Head, ResponseFramer
from mtls_proxy.http1.response import BodyMode, HeadCache, MalformedResponse, ResponseHead

if TYPE_CHECKING:
    from collections.abc import Callable


class ResponseSink(Protocol):
    """What the client side implements to receive one upstream response."""

    def on_response_head(self, head: ResponseHead, mode: BodyMode, length: int) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_end(self, conn: UpstreamConnection, reusable: bool) -> None: ...
    def on_upstream_error(self, conn: UpstreamConnection, exc: ProxyError, kind: str) -> None: ...
    def flush(self) -> None: ...
    def upstream_first_byte(self) -> None: ...
    def pause_client_reading(self, paused: bool) -> None: ...
    def on_switch(self, head: ResponseHead) -> None: ...
    def on_tunnel_data(self, data: bytes) -> None: ...
    def on_tunnel_closed(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One pooled connection to the upstream, parsing one response at a time.

    The framing is framing.ResponseFramer's; this shell feeds it the reads and hands its events
    to the sink."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self.reused = False
        self._framer = ResponseFramer(pool.heads.parse)
        self._tunnel = False
        self._got_byte = False

    # -- driven by the client side ---------------------------------------------------------
    def begin(self, sink: ResponseSink, is_head: bool, ws_key: bytes | None = None) -> None:
        """Start waiting for the response to a request that is being written now (*ws_key*:
        a WebSocket upgrade, which a valid 101 turns into a tunnel)."""
        self.sink, self._tunnel, self._got_byte = sink, False, False
        self._framer.start(is_head, ws_key)

    def write(self, data: bytes) -> None:
        """Write request bytes."""
        if self.transport is not None:
            self.transport.write(data)

    def pause_reading(self) -> bool:
        """The client reads slowly: stop reading this response (False: no connection left)."""
        if self.transport is None:
            return False
        self.transport.pause_reading()
        return True

    def resume_reading(self) -> None:
        """The client caught up."""
        if self.transport is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        """Close without reuse (aborts a response in flight)."""
        self.sink = None
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Remember the transport."""
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        """Parse response bytes and pass them to the sink."""
        sink = self.sink
        if sink is None:
            # Unsolicited bytes on an idle connection: never let them reach another client.
            self.close()
            self.pool.discard(self)
            return
        if self._tunnel:
            sink.on_tunnel_data(data)
            sink.flush()
            return
        if not self._got_byte:
            self._got_byte = True
            sink.upstream_first_byte()
        events: list[Event] = []
        try:
            self._framer.feed(data, events)
            failed = False
        except MalformedResponse:
            failed = True  # the events before the error are delivered first, as they came
        for ev in events:
            # Most frequent first: body pieces, then the ends and heads of responses.
            if isinstance(ev, bytes):
                sink.on_response_body(ev)
            elif isinstance(ev, EndOfMessage):
                self._finish(sink, ev.reusable)
            elif isinstance(ev, Head):
                sink.on_response_head(ev.head, ev.mode, ev.length)
            else:  # a Switch: the connection is a tunnel and never returns to the pool
                self._tunnel = True
                sink.on_switch(ev.head)
                if ev.rest:
                    sink.on_tunnel_data(ev.rest)
        if failed:
            self._fail(UpstreamUnavailable(), "protocol")
        sink.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        """End a close-delimited body, or report the failure; drop from the pool."""
        self.pool.discard(self)
        sink, self.transport = self.sink, None
        if sink is None:
            return
        if self._tunnel:
            self.sink = None
            sink.on_tunnel_closed()
            return
        try:
            end = self._framer.eof()
        except MalformedResponse:  # the response was cut short
            self.sink = None
            sink.on_upstream_error(self, UpstreamUnavailable(), "reset")
            return
        if end is not None:
            self._finish(sink, end.reusable)
            sink.flush()

    def pause_writing(self) -> None:
        """The upstream is slow to read: stop reading the client."""
        if self.sink is not None:
            self.sink.pause_client_reading(True)

    def resume_writing(self) -> None:
        """The upstream caught up."""
        if self.sink is not None:
            self.sink.pause_client_reading(False)

    # -- the end of a response -------------------------------------------------------------
    def _fail(self, exc: ProxyError, kind: str) -> None:
        sink, self.sink = self.sink, None
        if self.transport is not None:
            self.transport.close()
        if sink is not None:
            sink.on_upstream_error(self, exc, kind)

    def _finish(self, sink: ResponseSink, reusable: bool) -> None:
        self.sink = None
        sink.on_response_end(self, reusable)


class UpstreamPool:
    """Idle keep-alive connections to one upstream, most recently used first."""

    def __init__(
        self,
        upstream: Upstream,
        connect_timeout: float,
        max_idle: int = 256,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.upstream = upstream
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.ssl_context = ssl_context
        self.idle: list[UpstreamConnection] = []
        self.heads = HeadCache()

    def take_idle(self) -> UpstreamConnection | None:
        """An idle connection that is still open, or None."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        """Open a new connection within the connect timeout."""
        loop = asyncio.get_running_loop()
        factory: Callable[[], UpstreamConnection] = lambda: UpstreamConnection(self)  # noqa: E731
        u = self.upstream
        try:
            async with asyncio.timeout(self.connect_timeout):
                if u.scheme == "unix":
                    _, proto = await loop.create_unix_connection(factory, u.path)
                else:
                    _, proto = await loop.create_connection(
                        factory,
                        u.host,
                        u.port,
                        ssl=self.ssl_context,
                        server_hostname=u.host if self.ssl_context else None,
                    )
        except TimeoutError:
            raise UpstreamTimeout from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamUnavailable from exc
        return proto

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection whose response completed cleanly."""
        t = conn.transport
        if t is None or t.is_closing() or len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.sink = None
        self.idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        """Forget a connection that closed."""
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def close(self) -> None:
        """Close every idle connection."""
        for conn in self.idle:
            conn.close()
        self.idle.clear()
