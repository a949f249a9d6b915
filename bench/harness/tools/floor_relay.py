#!/usr/bin/env python3
"""The floor of the l4 and egress phases: the cheapest Python TCP relay with TLS on one side.

uvloop protocols and nothing else: no logging, metrics, timeouts or limits. Back-pressure both
ways (a side stops reading while its peer's write buffer is full); an EOF ends the other side.

  floor_relay.py --listen PORT --upstream HOST:PORT --tls-in  CERT KEY CA [--allow-cn CN]
      mTLS terminated here (client certificate required; the CN checked once per connection)
  floor_relay.py --listen PORT --upstream HOST:PORT --tls-out CERT KEY CA --server-name NAME
      plaintext in, mTLS out (our client certificate, the server verified against CA and NAME;
      no session resumption: uvloop's create_connection takes no session)
"""

import argparse
import asyncio
import ssl

import uvloop

LIMIT = 1 << 20  # write-buffer high-water mark, both sides


class Half(asyncio.Protocol):
    """One side of a relayed connection; `peer` is the other side's Half."""

    def __init__(self):
        self.transport = None
        self.peer = None
        self.early = []  # read before the upstream connection is up (uvloop may deliver some)

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=LIMIT)

    def data_received(self, data):
        if self.peer is None:
            self.early.append(data)
        else:
            self.peer.transport.write(data)

    def eof_received(self):
        pt = self.peer.transport if self.peer else None
        if pt is None or pt.is_closing():
            return False
        if pt.can_write_eof():  # a plain TCP peer: pass the half-close on
            pt.write_eof()
            return self.transport.get_extra_info("sslcontext") is None  # TLS: no half-close
        pt.close()
        return False

    def pause_writing(self):
        if self.peer:
            self.peer.transport.pause_reading()

    def resume_writing(self):
        if self.peer:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc):
        self.early = []
        if self.peer and self.peer.transport:
            self.peer.transport.close()
        self.peer = None


class Downstream(Half):
    def __init__(self, args, out_ctx):
        super().__init__()
        self.args = args
        self.out_ctx = out_ctx

    def connection_made(self, transport):
        super().connection_made(transport)
        if self.args.allow_cn:
            cert = transport.get_extra_info("peercert") or {}
            cns = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
            if cns != [self.args.allow_cn]:
                transport.abort()
                return
        transport.pause_reading()
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self):
        host, port = self.args.upstream.rsplit(":", 1)
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(
                Half,
                host,
                int(port),
                ssl=self.out_ctx,
                server_hostname=self.args.server_name if self.out_ctx else None,
            )
        except (OSError, ssl.SSLError):
            self.transport.abort()
            return
        if self.transport.is_closing():
            up.transport.close()
            return
        up.peer, self.peer = self, up
        for data in self.early:
            up.transport.write(data)
        self.early = []
        self.transport.resume_reading()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--listen", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--tls-in", nargs=3, metavar=("CERT", "KEY", "CA"))
    p.add_argument("--tls-out", nargs=3, metavar=("CERT", "KEY", "CA"))
    p.add_argument("--allow-cn")
    p.add_argument("--server-name", default="localhost")
    a = p.parse_args()
    in_ctx = out_ctx = None
    if a.tls_in:
        in_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        in_ctx.load_cert_chain(a.tls_in[0], a.tls_in[1])
        in_ctx.load_verify_locations(a.tls_in[2])
        in_ctx.verify_mode = ssl.CERT_REQUIRED
    if a.tls_out:
        out_ctx = ssl.create_default_context(cafile=a.tls_out[2])
        out_ctx.load_cert_chain(a.tls_out[0], a.tls_out[1])

    async def serve():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: Downstream(a, out_ctx), "127.0.0.1", a.listen, ssl=in_ctx, backlog=4096
        )
        async with server:
            await server.serve_forever()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
