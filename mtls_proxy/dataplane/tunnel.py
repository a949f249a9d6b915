"""A WebSocket after the upstream's 101: the client connection's protocol becomes a byte pipe.

The HTTP/1.1 protocol hands the transport to a `Tunnel` (transport.set_protocol) once the
upstream accepted the upgrade (websocket.py): from then on client bytes go upstream untouched,
with no parser, no deadlines but --send-timeout, and no further request. The upstream's bytes
come back through the exchange (upstream.py's tunnel state), which counts them.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mtls_proxy.dataplane.exchange import Exchange


class Owner(Protocol):
    """The client connection the tunnel took over (its lifecycle and send deadline)."""

    aborting: bool  # the proxy cut the connection (the send timeout, a trust change)

    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...


class Tunnel(asyncio.Protocol):
    """The client side of a WebSocket."""

    __slots__ = ("ex", "owner")

    def __init__(self, owner: Owner, ex: Exchange) -> None:
        self.owner, self.ex = owner, ex

    def data_received(self, data: bytes) -> None:
        """Client bytes go upstream untouched."""
        ex = self.ex
        ex.bytes_in += len(data)
        if ex.upstream is not None:
            ex.upstream.write(data)

    def eof_received(self) -> bool:
        """A half-closed WebSocket is closed (the upstream's side too)."""
        return False

    def pause_writing(self) -> None:
        """The client reads slowly: the connection's --send-timeout applies."""
        self.owner.pause_writing()

    def resume_writing(self) -> None:
        """The client caught up."""
        self.owner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        """The client ended the WebSocket: close the upstream's side, record it, and let the
        connection release what it holds."""
        ex = self.ex
        if ex.upstream is not None:  # else the upstream closed first and it is recorded
            ex.upstream.close()
            ex.upstream = None
            ex.finish(aborted=self.owner.aborting)
        self.owner.connection_lost(exc)
