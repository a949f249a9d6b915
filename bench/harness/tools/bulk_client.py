#!/usr/bin/env python3
"""Bulk load of the l4 and egress phases: one long connection through a relay to
tools/tcp_backend, timed from the first byte written to the last byte that proves delivery.

  bulk_client.py --port P --mode sink --size BYTES [--tls CERT KEY CA]
      one way: 'S' + 8-byte length + BYTES; done when the backend's 'K' arrives
  bulk_client.py --port P --mode echo --size BYTES [--tls CERT KEY CA]
      both ways: BYTES written (the first one 'E') while the echo is read; done when all BYTES
      came back

Prints one JSON line: {"mode", "bytes", "seconds", "ok"}. uvloop; the TLS client (with --tls)
sends CERT (chain) and KEY and verifies the server against CA for the name "localhost".
"""

import argparse
import asyncio
import json
import os
import ssl
import sys
import time

import uvloop

BLOCK = 256 * 1024


class Bulk(asyncio.Protocol):
    def __init__(self, mode, size, done):
        self.mode, self.size, self.done = mode, size, done
        self.block = os.urandom(BLOCK)
        self.first = b"E" + self.block[1:] if mode == "echo" else self.block
        self.left = size  # bytes still to write
        self.got = 0  # bytes read back (echo) or the ack (sink)
        self.paused = False
        self.transport = None
        self.t0 = 0.0

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=4 * BLOCK)
        self.t0 = time.monotonic()
        if self.mode == "sink":
            transport.write(b"S" + self.size.to_bytes(8, "big"))
        self.pump()

    def pump(self):
        while self.left > 0 and not self.paused:
            chunk = self.first if self.left == self.size else self.block  # 'E' first, once
            n = min(self.left, BLOCK)
            self.transport.write(chunk[:n] if n < BLOCK else chunk)
            self.left -= n

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        self.pump()

    def data_received(self, data):
        self.got += len(data)
        want = 1 if self.mode == "sink" else self.size
        if self.got >= want and not self.done.done():
            ok = data[-1:] == b"K" if self.mode == "sink" else self.got == self.size
            self.done.set_result((time.monotonic() - self.t0, ok))
            self.transport.close()

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_result((time.monotonic() - self.t0, False))


async def run(a):
    loop = asyncio.get_running_loop()
    ctx = None
    if a.tls:
        ctx = ssl.create_default_context(cafile=a.tls[2])
        ctx.load_cert_chain(a.tls[0], a.tls[1])
    done = loop.create_future()
    await loop.create_connection(
        lambda: Bulk(a.mode, a.size, done),
        "127.0.0.1",
        a.port,
        ssl=ctx,
        server_hostname="localhost" if ctx else None,
    )
    secs, ok = await asyncio.wait_for(done, a.timeout)
    return {"mode": a.mode, "bytes": a.size, "seconds": round(secs, 4), "ok": ok}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=["sink", "echo"], required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--tls", nargs=3, metavar=("CERT", "KEY", "CA"))
    p.add_argument("--timeout", type=float, default=120.0)
    a = p.parse_args()
    try:
        r = uvloop.run(run(a))
    except (TimeoutError, OSError, ssl.SSLError) as e:
        r = {"mode": a.mode, "bytes": a.size, "seconds": None, "ok": False, "error": repr(e)}
    print(json.dumps(r))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
