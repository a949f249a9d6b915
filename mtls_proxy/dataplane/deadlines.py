"""The HTTP/1.1 connection's clocks: idle, header, body and send deadlines, and the current
exchange's upstream deadline, all checked by the listener's sweeper (check_deadlines) instead of
one timer per request (connection.py rule 4).

A mixin of connection.Http1Connection, kept apart so that its module holds the parsing and
queueing state machine and this one the rules for when a quiet peer is cut.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from mtls_proxy.core.errors import RequestTimeout

if TYPE_CHECKING:
    import asyncio

    from mtls_proxy.core.errors import ProxyError
    from mtls_proxy.dataplane.exchange import Exchange
    from mtls_proxy.dataplane.flow import ReadGate
    from mtls_proxy.dataplane.plane import DataPlane
    from mtls_proxy.dataplane.reader import RequestReader
    from mtls_proxy.dataplane.tunnel import Tunnel

# What the connection waits for (the meaning of `deadline`).
WAIT_IDLE: Final = 1
WAIT_HEAD: Final = 2
WAIT_BODY: Final = 3


class Http1Deadlines:
    """The deadlines of one client connection (the connection's own attributes)."""

    if not TYPE_CHECKING:
        # Empty at run time, so the connection's own __slots__ hold these attributes; hidden
        # from mypy, which would refuse assignments to names a mixin's slots do not list.
        __slots__ = ()
    plane: DataPlane
    transport: asyncio.Transport | None
    flow: ReadGate
    reader: RequestReader
    tunnel: Tunnel | None
    deadline: float  # idle, header or body deadline (loop time); 0 = none
    send_deadline: float  # writing is paused: the client must take a byte by then
    write_paused: bool
    _waiting: int  # WAIT_*
    _upstream_paused: bool
    _queue: list[Exchange]

    if TYPE_CHECKING:  # the connection's methods these rules call

        def _reject(self, err: ProxyError) -> None: ...
        def _start_next(self) -> None: ...
        def trim(self) -> None: ...
        def abort(self) -> None: ...

    def pause_writing(self) -> None:
        """The client reads slowly: stop reading the upstream, and give the client
        --send-timeout to take a byte (nginx's send_timeout), or a client that stops reading
        would hold this connection and the upstream's forever."""
        self.send_deadline = self.plane.clock() + self.plane.cfg.send_timeout
        self.write_paused = True  # and no pipelined response starts meanwhile (_start_next)
        if self._queue and self._queue[0].pause_upstream():
            self._upstream_paused = True

    def resume_writing(self) -> None:
        """The client caught up."""
        self.send_deadline = 0.0
        self.write_paused = False
        if self._upstream_paused:
            self._upstream_paused = False
            if self._queue:
                self._queue[0].resume_upstream(self.tunnel is not None)
        self._start_next()

    def check_deadlines(self, now: float) -> None:
        """Called by the sweeper: enforce the send, upstream, idle, header and body timeouts."""
        if not self._queue:
            self.trim()
        if self.send_deadline and now >= self.send_deadline:
            self.send_deadline = 0.0
            self._on_send_timeout()
            return
        queue = self._queue
        if queue and queue[0].up_deadline and now >= queue[0].up_deadline:
            queue[0].up_deadline = 0.0
            queue[0].on_upstream_timeout()
        if self.deadline and now >= self.deadline:
            self.deadline = 0.0
            if self._waiting == WAIT_BODY:
                if self.flow.reasons:  # we stopped reading (back-pressure), not the client
                    self.deadline = now + self.plane.cfg.body_timeout
                else:
                    self._waiting = WAIT_IDLE
                    self._reject(RequestTimeout())
                return
            if self._queue or self.transport is None:
                return
            if self._waiting == WAIT_HEAD and self.reader.in_head:
                self._reject(RequestTimeout())
            else:
                self.transport.close()

    def _on_send_timeout(self) -> None:
        """The client took no byte for --send-timeout: cut the connection (an orderly close
        would wait for the very writes it refuses); connection_lost records the exchange."""
        if self._queue and not self._queue[0].reason:
            took = self.plane.cfg.send_timeout
            self._queue[0].reason = f"send timeout: the client took no response byte for {took} s"
        self.abort()

    def _wait(self, what: int) -> None:
        cfg = self.plane.cfg
        self._waiting = what
        self.deadline = self.plane.clock() + (
            cfg.idle_timeout if what == WAIT_IDLE else cfg.header_timeout
        )
