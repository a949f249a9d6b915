"""How HTTP/1.1 frames what an exchange hands the client: the response head re-framed by
response.client_head, body pieces chunk-encoded when the client's framing is chunked, the proxy's
own error answers, and one TLS write per batch (flush).

A mixin of connection.Http1Connection (the exchange.Downstream methods that only write), kept apart
so that the connection's module holds its state machine and this one the bytes it writes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from mtls_proxy.http1.framing import LAST_CHUNK, encode_chunk
from mtls_proxy.http1.response import client_head, error_response

if TYPE_CHECKING:
    import asyncio

    from mtls_proxy.dataplane.exchange import Exchange
    from mtls_proxy.http1.response import BodyMode, ResponseHead

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


class Http1Framing:
    """Writes into ``_out`` and flushes it to ``transport`` (both the connection's)."""

    __slots__ = ()
    _out: list[bytes]
    transport: asyncio.Transport | None
    draining: bool
    peer_done: bool
    _queue: list[Exchange]

    def send_continue(self, ex: Exchange) -> None:
        """100 Continue: the client may send the body."""
        self._out.append(_CONTINUE)

    def send_head(self, ex: Exchange, head: ResponseHead, mode: BodyMode, length: int) -> None:
        """The re-framed response head (response.client_head); it says close when the
        connection closes after it, also as the last answer to a half-closed client."""
        close = ex.close or self.draining or (self.peer_done and self._queue[-1] is ex)
        data, ex.client_chunked, ex.close = client_head(head, mode, length, ex.http10, close)
        self._out.append(data)

    def send_data(self, ex: Exchange, data: bytes) -> None:
        """A body piece, chunk-encoded if the client's framing is chunked."""
        if ex.client_chunked:
            if data:
                self._out.append(encode_chunk(data))
        else:
            self._out.append(data)

    def send_end(self, ex: Exchange) -> None:
        """The last chunk, if chunked."""
        if ex.client_chunked:
            self._out.append(LAST_CHUNK)

    def send_error(self, ex: Exchange, status: int, error: str, message: str) -> None:
        """A short JSON error response of our own."""
        self._out.append(error_response(status, error, message, ex.is_head, ex.close))

    def flush(self) -> None:
        """Write what the exchange produced, in one TLS write."""
        out = self._out
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
