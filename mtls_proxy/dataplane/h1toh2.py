"""An HTTP/1.1 client's requests to an h2c upstream (--upstream-protocol h2c): the Downstream
methods h2exchange.H2Exchange calls beyond Exchange's, as a mixin of connection.Http1Connection.

With h2c the upstream may speak nothing but HTTP/2 (a grpcio server, an h2c-only service), so
every request goes there as an HTTP/2 stream, whatever the client speaks (Envoy does the same
with an HTTP/2 cluster). The response is re-framed by http2.response.h1_head.

Rules:
1. A response head HTTP/1.1 cannot carry (http2.response rule 4) is the upstream's protocol
   error: 502 before anything is sent.
2. Trailers are dropped (an HTTP/1.1 client that did not ask for them with TE: trailers must not
   get them, and gRPC, the one user of trailers, needs HTTP/2 on both sides); the chunked body
   ends with the last chunk.
3. A stream the upstream resets after the response head cuts the connection: the client sees
   the response end early, as for an HTTP/1.1 upstream that fails inside a body.
4. Request bodies are back-pressured by the upstream's HTTP/2 window: the client is not read
   while more than HOLD bytes wait for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from mtls_proxy.dataplane.h2exchange import H2Exchange
from mtls_proxy.http1.response import MalformedResponse
from mtls_proxy.http2.response import h1_head

if TYPE_CHECKING:
    from mtls_proxy.dataplane.exchange import Exchange
    from mtls_proxy.dataplane.flow import ReadGate
    from mtls_proxy.dataplane.h2upstream import H2UpstreamPool
    from mtls_proxy.dataplane.plane import DataPlane
    from mtls_proxy.http1.response import BodyMode, ResponseHead

HOLD: Final = 256 * 1024


class Http1ToH2:
    """The HTTP/1.1 connection's side of an H2Exchange (the connection's own attributes)."""

    if not TYPE_CHECKING:
        __slots__ = ()
    plane: DataPlane
    flow: ReadGate

    if TYPE_CHECKING:  # the connection's methods these rules call

        def send_head(
            self, ex: Exchange, head: ResponseHead, mode: BodyMode, length: int
        ) -> None: ...
        def abort(self) -> None: ...

    @property
    def h2pool(self) -> H2UpstreamPool | None:
        """The h2c upstream connections."""
        return self.plane.h2pool

    def send_h2_head(
        self, ex: Exchange, headers: list[tuple[bytes, bytes]], end_stream: bool
    ) -> bool:
        """The response head as HTTP/1.1; False when it cannot be one (rule 1)."""
        try:
            head, mode, length = h1_head(headers, ex.is_head)
        except MalformedResponse:
            return False
        self.send_head(ex, head, mode, length)
        return True

    def send_trailers(self, ex: Exchange, headers: list[tuple[bytes, bytes]]) -> None:
        """Rule 2: dropped; send_end follows."""

    def send_reset(self, ex: Exchange, code: int) -> None:
        """Rule 3."""
        ex.close = True
        self.abort()

    def ack(self, ex: Exchange, n: int) -> None:
        """Request bytes left for the upstream: read the client again below HOLD (rule 4)."""
        if not isinstance(ex, H2Exchange) or ex.upstream_backlog() <= HOLD:
            self.flow.resume("buffer")
