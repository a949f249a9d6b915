"""The floor: the cheapest Python/uvloop mTLS relay, with no proxy logic (issue 18).

It terminates the same mutual TLS as the proxy (uvloop's SSL transport, the client CA,
CERT_REQUIRED), checks the client's CN once per connection, and passes bytes to the upstream
unparsed over one upstream connection per client. Every bench table carries it as a row, so
that each figure also reads as "x of the floor": what the proxy adds over what the platform
(CPython, uvloop, OpenSSL) costs anyway.

    python bench/harness/tools/floor.py HOST:PORT UPSTREAM_HOST:UPSTREAM_PORT CERT KEY CLIENT_CA ALLOWED_CN
"""

from __future__ import annotations

import asyncio
import ssl
import sys

import uvloop


class Up(asyncio.Protocol):
    def __init__(self, down: asyncio.Transport) -> None:
        self.down = down

    def data_received(self, data: bytes) -> None:
        self.down.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.close()


class Down(asyncio.Protocol):
    def __init__(self, upstream: tuple[str, int], cn: str) -> None:
        self.upstream, self.cn = upstream, cn
        self.held: list[bytes] = []
        self.up: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        subject = dict(x[0] for x in transport.get_extra_info("peercert")["subject"])
        if subject.get("commonName") != self.cn:
            transport.close()
            return
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        self.up, _ = await loop.create_connection(lambda: Up(self.t), *self.upstream)
        self.up.write(b"".join(self.held))

    def data_received(self, data: bytes) -> None:
        if self.up is None:
            self.held.append(data)
        else:
            self.up.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.close()


async def main(listen: str, upstream: str, cert: str, key: str, ca: str, cn: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    host, port = listen.rsplit(":", 1)
    uh, up = upstream.rsplit(":", 1)
    server = await asyncio.get_running_loop().create_server(
        lambda: Down((uh, int(up)), cn), host, int(port), ssl=ctx, backlog=4096
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(*sys.argv[1:7]))
