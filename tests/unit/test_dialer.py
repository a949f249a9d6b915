"""dataplane/dialer.RemoteTLS against a real TLS server (ssl.SSLObject over memory BIOs), driven
byte by byte as the event loop would: what reaches the app, in which order."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

from mtls_proxy.core.egress import load_client_config
from mtls_proxy.dataplane.dialer import Dialer, RemoteTLS
from mtls_proxy.material.egress import client_context, load_client_material
from tests.helpers import Pki


class Raw(asyncio.Transport):
    """The TCP transport under RemoteTLS: records what it writes."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.reading = True

    def write(self, data: Any) -> None:
        self.out += data

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return False

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        pass


class App(asyncio.Protocol):
    """Pauses after the first piece, as a slow local client makes EgressRelay do."""

    def __init__(self) -> None:
        self.got = bytearray()
        self.events: list[str] = []
        self.t: RemoteTLS | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got += data
        self.events.append("data")
        assert self.t is not None
        self.t.pause_reading()

    def eof_received(self) -> bool:
        self.events.append("eof")
        return True


def _server(tp: Pki) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tp.crt("server"), tp.key("server"))
    ctx.load_verify_locations(tp.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    return ctx.wrap_bio(inc, out, server_side=True), inc, out


def test_a_fin_while_the_app_is_paused_comes_after_every_byte(tp: Pki) -> None:
    """The remote's last records, its close_notify and its FIN arrive while the app has paused
    reading: the app must get every byte, then the end (the FIN used to be told at once, with
    records still inside OpenSSL: a truncated stream that looked complete)."""

    async def run() -> App:
        cfg = load_client_config(
            flags={"listen": "127.0.0.1:1", "target": "localhost:1", "cert": tp.crt("good"),
                   "key": tp.key("good"), "cacert": tp.ca},
        )  # fmt: skip
        dialer = Dialer(cfg, client_context(cfg, load_client_material(cfg)))
        app = App()
        layer = RemoteTLS(dialer, None, lambda: app)
        raw = Raw()
        server, inc, out = _server(tp)
        layer.connection_made(raw)
        while not layer.ready.done():  # the handshake, flight by flight
            inc.write(raw.take())
            with contextlib.suppress(ssl.SSLWantReadError):
                server.do_handshake()
            layer.data_received(out.read())
        inc.write(raw.take())
        body = bytes(range(256)) * 400  # 100 KiB: several records
        server.write(body)
        with contextlib.suppress(ssl.SSLWantReadError):
            server.unwrap()  # close_notify
        layer.data_received(out.read())  # everything in one read: the app pauses after one
        layer.eof_received()  # then the TCP FIN
        assert app.events == ["data"]  # not "eof" before the rest
        for _ in range(20):
            layer.resume_reading()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        assert bytes(app.got) == body
        return app

    app = asyncio.run(run())
    assert app.events[-1] == "eof" and app.events.count("eof") == 1
