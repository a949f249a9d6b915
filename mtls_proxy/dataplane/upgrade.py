"""The HTTP/1.1 connection's one protocol switch: a WebSocket upgrade (connection.py rule 5).

Until the upstream answers an upgrade request, the bytes after it are held (they are frames
after a 101, or the next request after a refusal); the upstream's valid 101 hands the transport
to a `Tunnel` (tunnel.py); a declined upgrade parses the held bytes as the next request. Any
other Upgrade went upstream as a plain request (Upgrade stripped) and the connection stays HTTP.

A mixin of connection.Http1Connection.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from mtls_proxy.dataplane.tunnel import Tunnel
from mtls_proxy.http1.websocket import client_switch

if TYPE_CHECKING:
    from mtls_proxy.dataplane.exchange import Exchange
    from mtls_proxy.dataplane.flow import ReadGate
    from mtls_proxy.dataplane.reader import RequestReader
    from mtls_proxy.http1.response import ResponseHead


class Http1Upgrade:
    """The upgrade state of one client connection (the connection's own attributes)."""

    if not TYPE_CHECKING:
        # Empty at run time, so the connection's own __slots__ hold these attributes; hidden
        # from mypy, which would refuse assignments to names a mixin's slots do not list.
        __slots__ = ()
    transport: asyncio.Transport | None
    flow: ReadGate
    reader: RequestReader
    deadline: float
    draining: bool
    tunnel: Tunnel | None
    ws_pending: bytes | None  # bytes after an upgrade request, until its answer
    aborting: bool
    _out: list[bytes]
    _last: Exchange | None

    if TYPE_CHECKING:  # the connection's own

        def data_received(self, data: bytes) -> None: ...
        def pause_writing(self) -> None: ...
        def resume_writing(self) -> None: ...
        def connection_lost(self, exc: Exception | None) -> None: ...

    def on_upgrade(self, rest: bytes) -> None:
        """llhttp stopped after a request that asks for a protocol switch."""
        last = self._last
        if last is not None and last.ws_key is not None and not last.status:
            # A WebSocket upgrade on its way upstream: what follows is frames after a 101, or
            # the next request if the upstream declines. Hold it until the answer.
            self.ws_pending = rest
            self.flow.pause("upgrade")
            return
        # Any other upgrade went upstream as a plain request (Upgrade stripped); the bytes after
        # it are parsed as HTTP by a fresh parser (SMG-058).
        self.reader.restart()
        if rest:
            self.data_received(rest)

    def send_switch(self, ex: Exchange, head: ResponseHead) -> None:
        """The 101, then the transport belongs to a Tunnel (rule 5)."""
        self.deadline = 0.0  # a WebSocket may be quiet for hours
        self._out.append(client_switch(head))
        self.tunnel = tunnel = Tunnel(self, ex)
        if self.transport is not None:
            self.transport.set_protocol(tunnel)
        pending, self.ws_pending = self.ws_pending, None
        if pending:
            tunnel.data_received(pending)
        self.flow.resume("upgrade")

    def _declined(self, ex: Exchange) -> None:
        """The upstream declined a WebSocket upgrade: the held bytes are the next request
        (SMG-058)."""
        pending, self.ws_pending = self.ws_pending, None
        self.reader.restart()
        if pending and not (ex.close or self.draining):
            # Before reading resumes: the transport delivers what arrived meanwhile from the
            # loop too, and the held bytes came first (red team, second pass).
            asyncio.get_running_loop().call_soon(self.data_received, pending)
        self.flow.resume("upgrade")
