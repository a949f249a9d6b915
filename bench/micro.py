"""Per-request CPU of the data plane's Python code alone, with in-memory transports.

Drives Http1Connection (with its Exchange) and UpstreamConnection through a keep-alive request/response cycle exactly
as the event loop would (data_received on both sides) but with no sockets or TLS, so the figure is
repeatable and isolates what the proxy adds on top of the transport floor.

    python bench/micro.py [N] [--profile] [--traceparent] [--otel]

--traceparent: each request carries a valid W3C traceparent; --otel: spans on (the SDK, its
batch processor, an exporter that discards: what the proxy itself adds per span).
"""

from __future__ import annotations

import asyncio
import cProfile
import pstats
import sys
import time

from mtls_proxy.core.config import load_config
from mtls_proxy.dataplane.admission import admit
from mtls_proxy.dataplane.connection import Http1Connection
from mtls_proxy.dataplane.plane import DataPlane
from mtls_proxy.dataplane.upstream import UpstreamConnection, UpstreamPool
from mtls_proxy.material.generation import build
from mtls_proxy.material.tls import Material
from mtls_proxy.telemetry.logs import AccessLog
from mtls_proxy.telemetry.metrics import Metrics

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:18443\r\n\r\n"
TRACEPARENT = b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 29 Nov 2026 08:43:48 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 64\r\nConnection: keep-alive\r\n"
    b"X-Client-Subject: CN=client-a,O=bench\r\nX-Client-URI: \r\n\r\n" + b"x" * 64
)


class FakeTransport(asyncio.Transport):
    def __init__(self, extra: dict[str, object]) -> None:
        super().__init__()
        self.extra, self.out = extra, 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.extra.get(name, default)

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.out += len(data)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...


class FakeSSL:
    session_reused = False  # a full handshake (the chain is remembered for resumptions)

    def __init__(self, der: bytes) -> None:
        self.der = der

    def get_verified_chain(self) -> list[object]:
        return []

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self.der

    def version(self) -> str:
        return "TLSv1.3"

    def cipher(self) -> tuple[str, str, int]:
        return ("TLS_AES_256_GCM_SHA384", "TLSv1.3", 256)


async def run(n: int, profile: bool) -> None:
    from cryptography.hazmat.primitives import serialization

    from mtls_proxy.cli import pki

    root = pki.make_ca("r")
    leaf = pki.issue(
        root, "client", "client-a", o="bench", uris=["spiffe://example.org/ns/default/sa/client-a"]
    )
    der = leaf.cert.public_bytes(serialization.Encoding.DER)
    cfg = load_config(
        flags={
            "upstream": "http://127.0.0.1:9",
            "cert": "x",
            "key": "y",
            "cacert": "z",
            "allow-cn": ["client-a"],
        }
    )
    loop = asyncio.get_running_loop()

    class NullStream:
        def write(self, s: str) -> int:
            return len(s)

        def flush(self) -> None: ...

    server = pki.issue(root, "server", "proxy", dns=["localhost"])
    material = Material("x", server.key, (server.cert,), "z", (root.cert,))
    gen = build(cfg, material, cfg.policy)
    pool = UpstreamPool(cfg.upstream, 1.0)
    plane = DataPlane(cfg, gen, Metrics(), pool, loop.time, AccessLog("json", NullStream()))  # type: ignore[arg-type]
    if "--otel" in sys.argv:
        from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

        from mtls_proxy.telemetry.tracing import Tracing

        class Discard(SpanExporter):
            def export(self, spans: object) -> SpanExportResult:  # type: ignore[override]
                return SpanExportResult.SUCCESS

        plane.tracing = Tracing("http://unused.invalid/v1/traces", exporter=Discard())
        plane.trace_make = plane.tracing.start
    request = REQUEST[:-2] + TRACEPARENT + b"\r\n" if "--traceparent" in sys.argv else REQUEST
    up = UpstreamConnection(pool)
    up.connection_made(FakeTransport({}))
    pool.idle.append(up)
    client = Http1Connection(plane, admit(plane, gen, FakeSSL(der)), lambda: None)  # type: ignore[arg-type]
    client.connection_made(
        FakeTransport(
            {
                "peername": ("127.0.0.1", 5555),
                "sockname": ("127.0.0.1", 8443),
            }
        )
    )

    def cycle() -> None:
        client.data_received(request)
        up.data_received(RESPONSE)

    for _ in range(2000):
        cycle()
    prof = cProfile.Profile() if profile else None
    t0 = time.process_time()
    if prof:
        prof.enable()
    for _ in range(n):
        cycle()
    if prof:
        prof.disable()
    dt = time.process_time() - t0
    print(f"{dt / n * 1e6:.1f} us CPU per request (Python data plane only, {n} requests)")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 50000
    asyncio.run(run(count, "--profile" in sys.argv))
