"""The TLS layer's close after a half-close (tlsconn.py) with a client that reads nothing: the
socket, and with it the --max-connections slot, must be let go (red team F2: it was held for as
long as the client kept its socket open). A real TLS session over memory BIOs; the TCP transport
under the layer is a fake whose send buffer never drains."""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from mtls_proxy.cli import pki
from mtls_proxy.dataplane.tlsconn import TLSServerLayer

ROOT = pki.make_ca("linger root")
SERVER = pki.issue(ROOT, "server", "localhost", dns=["localhost"])


class StuckSocket(asyncio.Transport):
    """A TCP transport whose peer takes no byte: writes stay buffered, close() never ends."""

    def __init__(self, layer: TLSServerLayer) -> None:
        super().__init__()
        self.layer = layer
        self.sent = bytearray()
        self.buffered = 0
        self.closed_at: float | None = None
        self.aborted_at: float | None = None

    def write(self, data: Any) -> None:
        self.sent += data
        self.buffered += len(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...

    def is_closing(self) -> bool:
        return self.closed_at is not None or self.aborted_at is not None

    def close(self) -> None:  # waits for the buffer to drain: it never does
        self.closed_at = self.closed_at or time.monotonic()

    def abort(self) -> None:
        self.aborted_at = time.monotonic()
        asyncio.get_running_loop().call_soon(self.layer.connection_lost, None)


class Answering(asyncio.Protocol):
    """Answers the first bytes with a response, keeps the connection for a half-close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000)  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        return False  # answered: close after it

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def _contexts(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    pki.write_pair(tmp, "server", SERVER)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp / "server.crt", tmp / "server.key")
    client = ssl.create_default_context(cadata=ROOT.cert.public_bytes(Encoding.PEM).decode())
    return server, client


def test_a_half_closed_client_that_reads_nothing_is_let_go(tmp_path: Path) -> None:
    server_ctx, client_ctx = _contexts(tmp_path)

    async def main() -> tuple[StuckSocket, Answering, float]:
        app = Answering()
        layer = TLSServerLayer(server_ctx, lambda _: app, patience=2.0)
        raw = StuckSocket(layer)
        layer.connection_made(raw)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
        for _ in range(10):  # the handshake, over the memory BIOs
            try:
                client.do_handshake()
                break
            except ssl.SSLWantReadError:
                layer.data_received(outgoing.read())
                incoming.write(bytes(raw.sent))
                raw.sent.clear()
        layer.data_received(outgoing.read())  # the client's Finished
        client.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        layer.data_received(outgoing.read())
        start = time.monotonic()
        layer.eof_received()  # its FIN: answered, then closed; the client reads nothing
        while not app.lost and time.monotonic() - start < 10:
            await asyncio.sleep(0.1)
        return raw, app, start

    raw, app, start = asyncio.run(main())
    assert raw.closed_at is not None  # the orderly close was tried first
    assert app.lost and raw.aborted_at is not None, "the socket is held as long as the client's"
    assert raw.aborted_at - start < 4.5  # within patience (2 s) and a linger tick or two
