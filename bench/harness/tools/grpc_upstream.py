#!/usr/bin/env python3
"""The gRPC upstream of the harness: a grpcio server, cleartext HTTP/2 (h2c), one process.

  /bench.Bench/Echo   unary; answers the request message's bytes unchanged (no protobuf: the
                      messages are opaque bytes, so no serialization cost on either side), and
                      echoes the request's x-client-subject / x-client-uri metadata back as
                      initial metadata, so the harness can check what a proxy injected
  /bench.Bench/Count  unary; answers how many Echo calls were served so far (ASCII digits), so
                      the harness can check that the calls a load generator counted as 2xx
                      really reached the upstream with grpc-status 0

  grpc_upstream.py --host 127.0.0.1 --port 18081 [--aio]

The classic thread-pool grpc.server by default: on this machine it served about 5,300 trivial
unary calls/s at 0.9 core (h2load, 160 streams in flight), grpc.aio 2,800/s; --aio runs the
latter.
"""

import argparse
import asyncio
import signal
import sys
from concurrent import futures

import grpc

ECHO = "/bench.Bench/Echo"
COUNT = "/bench.Bench/Count"
OPTS = [("grpc.max_concurrent_streams", 1000), ("grpc.so_reuseport", 0)]


class State:
    calls = 0


def _echo_md(context):
    """The identity metadata the upstream received, only for a call that asks (x-bench-echo),
    so that calls under load pay nothing for it."""
    md = dict(context.invocation_metadata())
    if "x-bench-echo" not in md:
        return ()
    return tuple((k, md.get(k, "")) for k in ("x-client-subject", "x-client-uri"))


def sync_handlers():
    def echo(req, context):
        State.calls += 1
        md = _echo_md(context)
        if md:
            context.send_initial_metadata(md)
        return req

    def count(req, context):
        return str(State.calls).encode()

    return grpc.method_handlers_generic_handler(
        "bench.Bench",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Count": grpc.unary_unary_rpc_method_handler(count),
        },
    )


def aio_handlers():
    async def echo(req, context):
        State.calls += 1
        md = _echo_md(context)
        if md:
            await context.send_initial_metadata(md)
        return req

    async def count(req, context):
        return str(State.calls).encode()

    return grpc.method_handlers_generic_handler(
        "bench.Bench",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Count": grpc.unary_unary_rpc_method_handler(count),
        },
    )


async def serve_aio(addr):
    server = grpc.aio.server(options=OPTS)
    server.add_generic_rpc_handlers((aio_handlers(),))
    server.add_insecure_port(addr)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()
    await server.stop(0.5)


def serve_sync(addr, workers):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=OPTS)
    server.add_generic_rpc_handlers((sync_handlers(),))
    server.add_insecure_port(addr)
    server.start()
    signal.signal(signal.SIGTERM, lambda *a: server.stop(0.5))
    server.wait_for_termination()


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=18081)
    p.add_argument("--aio", action="store_true")
    p.add_argument("--workers", type=int, default=16)
    a = p.parse_args()
    addr = f"{a.host}:{a.port}"
    if a.aio:
        asyncio.run(serve_aio(addr))
    else:
        serve_sync(addr, a.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
