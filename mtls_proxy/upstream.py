"""Upstream side of the data plane: a keep-alive connection pool and a strict response parser.

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
import re
import ssl
from typing import TYPE_CHECKING, Final, Protocol

from mtls_proxy.config import Upstream
from mtls_proxy.errors import ProxyError, UpstreamTimeout, UpstreamUnavailable
from mtls_proxy.response import (
    CHUNKED,
    LENGTH,
    NONE,
    HeadCache,
    MalformedResponse,
    ResponseHead,
    body_mode,
)
from mtls_proxy.websocket import check_switch

if TYPE_CHECKING:
    from collections.abc import Callable

MAX_RESPONSE_HEAD: Final = 65536
_MAX_LINE: Final = 8192
_CHUNK_SIZE: Final = re.compile(rb"([0-9A-Fa-f]{1,15})(;[^\x00-\x08\x0a-\x1f\x7f]*)?")
# Parser states.
_HEAD, _CL, _SIZE, _DATA, _CRLF, _TRAILER, _CLOSE, _DONE, _TUNNEL = range(9)


class ResponseSink(Protocol):
    """What the client side implements to receive one upstream response."""

    def on_response_head(self, head: ResponseHead, mode: int, length: int) -> None: ...
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
    """One pooled connection to the upstream, parsing one response at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self.reused = False
        self._state = _DONE
        self._is_head = False
        self._buf = b""
        self._remaining = 0
        self._http10 = False
        self._close_after = False
        self._got_byte = False
        self._ws_key: bytes | None = None

    # -- driven by the client side ---------------------------------------------------------
    def begin(self, sink: ResponseSink, is_head: bool, ws_key: bytes | None = None) -> None:
        """Start waiting for the response to a request that is being written now (*ws_key*:
        a WebSocket upgrade, which a valid 101 turns into a tunnel)."""
        self.sink, self._is_head, self._ws_key = sink, is_head, ws_key
        self._state, self._buf, self._got_byte = _HEAD, b"", False

    def write(self, data: bytes) -> None:
        """Write request bytes."""
        if self.transport is not None:
            self.transport.write(data)

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
        if self._state == _TUNNEL:
            sink.on_tunnel_data(data)
            sink.flush()
            return
        if not self._got_byte:
            self._got_byte = True
            sink.upstream_first_byte()
        try:
            self._feed(data, sink)
        except MalformedResponse:
            self._fail(UpstreamUnavailable(), "protocol")
        sink.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        """End a close-delimited body, or report the failure; drop from the pool."""
        self.pool.discard(self)
        sink, self.transport = self.sink, None
        if sink is None:
            return
        if self._state == _TUNNEL:
            self.sink = None
            sink.on_tunnel_closed()
        elif self._state == _CLOSE:
            self._finish(sink, False)
            sink.flush()
        elif self._state != _DONE:
            self.sink = None
            sink.on_upstream_error(self, UpstreamUnavailable(), "reset")

    def pause_writing(self) -> None:
        """The upstream is slow to read: stop reading the client."""
        if self.sink is not None:
            self.sink.pause_client_reading(True)

    def resume_writing(self) -> None:
        """The upstream caught up."""
        if self.sink is not None:
            self.sink.pause_client_reading(False)

    # -- parsing ---------------------------------------------------------------------------
    def _fail(self, exc: ProxyError, kind: str) -> None:
        sink, self.sink = self.sink, None
        self._state = _DONE
        if self.transport is not None:
            self.transport.close()
        if sink is not None:
            sink.on_upstream_error(self, exc, kind)

    def _finish(self, sink: ResponseSink, reusable: bool) -> None:
        self._state = _DONE
        self.sink = None
        sink.on_response_end(self, reusable and not self._http10 and not self._close_after)

    def _feed(self, data: bytes, sink: ResponseSink) -> None:
        if self._buf:
            data, self._buf = self._buf + data, b""
        while data:
            state = self._state
            if state == _CL:
                n = len(data)
                if n < self._remaining:
                    self._remaining -= n
                    sink.on_response_body(data)
                    return
                sink.on_response_body(data[: self._remaining] if n > self._remaining else data)
                # Bytes beyond the declared length: unsolicited, so the connection is not reused.
                self._finish(sink, n == self._remaining)
                return
            if state == _HEAD:
                end = data.find(b"\r\n\r\n")
                if end < 0 or end > MAX_RESPONSE_HEAD:
                    if len(data) > MAX_RESPONSE_HEAD:
                        raise MalformedResponse("response head too large")  # UPS-010
                    self._buf = data
                    return
                raw_head = data[:end]
                head = self.pool.heads.parse(raw_head)
                data = data[end + 4 :]
                if head.status < 200:
                    if head.status == 101:
                        if self._ws_key is None:
                            raise MalformedResponse("101 without an upgrade request")
                        check_switch(raw_head, self._ws_key)
                        self._state = _TUNNEL  # never returns to the pool
                        sink.on_switch(head)
                        if data:
                            sink.on_tunnel_data(data)
                        return
                    continue  # interim responses are not relayed (we sent no Expect)
                self._http10, self._close_after = head.http10, head.close
                mode, length = body_mode(head, self._is_head)
                sink.on_response_head(head, mode, length)
                if mode == NONE or (mode == LENGTH and length == 0):
                    self._finish(sink, not data)
                    return
                self._state, self._remaining = (
                    (_CL, length)
                    if mode == LENGTH
                    else (_SIZE, 0)
                    if mode == CHUNKED
                    else (_CLOSE, 0)
                )
            elif state == _CLOSE:
                sink.on_response_body(data)
                return
            elif state == _DATA:
                n = min(len(data), self._remaining)
                sink.on_response_body(data[:n] if n < len(data) else data)
                self._remaining -= n
                data = data[n:]
                if self._remaining == 0:
                    self._state = _CRLF
            elif state == _CRLF:
                if len(data) < 2:
                    self._buf = data
                    return
                if data[:2] != b"\r\n":
                    raise MalformedResponse("chunk data not followed by CRLF")
                data = data[2:]
                self._state = _SIZE
            elif state in (_SIZE, _TRAILER):
                end = data.find(b"\r\n")
                if end < 0:
                    if len(data) > _MAX_LINE:
                        raise MalformedResponse("chunk line too long")
                    self._buf = data
                    return
                line, data = data[:end], data[end + 2 :]
                if state == _TRAILER:
                    if not line:
                        self._finish(sink, not data)  # trailers are dropped, never forwarded
                        return
                    continue
                m = _CHUNK_SIZE.fullmatch(line)
                if m is None:
                    raise MalformedResponse("invalid chunk size line")
                size = int(m.group(1), 16)
                self._state, self._remaining = (_TRAILER, 0) if size == 0 else (_DATA, size)
            else:  # _DONE: a complete response was followed by more bytes
                self.close()
                self.pool.discard(self)
                return


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
