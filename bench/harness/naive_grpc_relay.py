#!/usr/bin/env python3
"""The naive Python gRPC baseline: a grpcio server with mTLS credentials that forwards each
unary call through one grpcio client channel (h2c) to the upstream. What one writes in an
afternoon with grpcio alone; the gRPC counterpart of naive_aiohttp_proxy.py.

  - ssl_server_credentials(require_client_auth=True) against --client-ca: a missing or untrusted
    client certificate fails the handshake (grpcio's C core verifies the chain);
  - PERMISSION_DENIED unless the peer certificate's CN is --allowed-cn (from auth_context());
  - the client's own x-client-subject / x-client-uri are dropped and the relay's set
    (RFC 2253 order, as the other targets: CN=client-a,O=bench);
  - any method, messages as opaque bytes (no protobuf), the upstream's initial metadata, trailing
    metadata and status passed back.

Sync grpc.server with a thread pool by default (blocking stub call per request thread);
--aio: grpc.aio server and channel on one asyncio loop.
"""

import argparse
import asyncio
import signal
import sys
from concurrent import futures
from pathlib import Path

import grpc

IDENTITY = {"x-client-subject", "x-client-uri"}
OPTS = [("grpc.max_concurrent_streams", 1000), ("grpc.so_reuseport", 0)]


def _identity(context, allowed_cn):
    ac = context.auth_context()
    cn = [v.decode() for v in ac.get("x509_common_name", [])]
    if allowed_cn not in cn:
        return None
    # grpc's x509_subject is OpenSSL's oneline-ish form ("CN=client-a,O=bench" in RFC 2253 order)
    subj = b"".join(ac.get("x509_subject", [])).decode() or f"CN={cn[0]}"
    uris = [v.decode() for v in ac.get("uri", []) if isinstance(v, bytes)]
    return subj, (uris[0] if uris else "")


def _timeout(context):
    """The client's deadline, if it sent one (grpc-timeout); without one grpcio's
    time_remaining() is not a usable timeout (every call failed DEADLINE_EXCEEDED)."""
    t = context.time_remaining()
    return t if t is not None and 0 < t < 86400 else None


def _metadata(context, subj, uri):
    md = [(k, v) for k, v in context.invocation_metadata() if k not in IDENTITY]
    md.append(("x-client-subject", subj))
    md.append(("x-client-uri", uri))
    return md


def sync_handler(upstream, allowed_cn):
    channel = grpc.insecure_channel(upstream)
    stubs = {}

    def relay_for(method):
        stub = stubs.get(method)
        if stub is None:
            stub = stubs[method] = channel.unary_unary(method)

        def relay(req, context):
            ident = _identity(context, allowed_cn)
            if ident is None:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "client not allowed")
            try:
                resp, call = stub.with_call(
                    req, metadata=_metadata(context, *ident), timeout=_timeout(context)
                )
            except grpc.RpcError as e:
                context.set_trailing_metadata(e.trailing_metadata() or ())
                context.abort(e.code(), e.details() or "")
            md = call.initial_metadata()
            if md:
                context.send_initial_metadata(md)
            context.set_trailing_metadata(call.trailing_metadata() or ())
            return resp

        return relay

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):
            return grpc.unary_unary_rpc_method_handler(relay_for(details.method))

    return Handler()


def aio_handler(upstream, allowed_cn):
    channel = grpc.aio.insecure_channel(upstream)
    stubs = {}

    def relay_for(method):
        stub = stubs.get(method)
        if stub is None:
            stub = stubs[method] = channel.unary_unary(method)

        async def relay(req, context):
            ident = _identity(context, allowed_cn)
            if ident is None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "client not allowed")
            call = stub(req, metadata=_metadata(context, *ident), timeout=_timeout(context))
            try:
                resp = await call
            except grpc.RpcError as e:
                await context.abort(e.code(), e.details() or "")
            md = await call.initial_metadata()
            if md:
                await context.send_initial_metadata(md)
            return resp

        return relay

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):
            return grpc.unary_unary_rpc_method_handler(relay_for(details.method))

    return Handler()


def creds(a):
    return grpc.ssl_server_credentials(
        [(Path(a.key).read_bytes(), Path(a.cert).read_bytes())],
        root_certificates=Path(a.client_ca).read_bytes(),
        require_client_auth=True,
    )


async def serve_aio(a):
    server = grpc.aio.server(options=OPTS)
    server.add_generic_rpc_handlers((aio_handler(a.upstream, a.allowed_cn),))
    server.add_secure_port(f"{a.host}:{a.port}", creds(a))
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()
    await server.stop(0.5)


def serve_sync(a):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=a.workers), options=OPTS)
    server.add_generic_rpc_handlers((sync_handler(a.upstream, a.allowed_cn),))
    server.add_secure_port(f"{a.host}:{a.port}", creds(a))
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0.5))
    server.wait_for_termination()


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--client-ca", required=True)
    p.add_argument("--upstream", required=True, help="host:port of the h2c gRPC upstream")
    p.add_argument("--allowed-cn", default="client-a")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--aio", action="store_true")
    a = p.parse_args()
    if a.aio:
        asyncio.run(serve_aio(a))
    else:
        serve_sync(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
