"""``mtls-proxy demo``: a throwaway PKI, an echo upstream and the proxy, all on loopback."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import sys
import tempfile
from pathlib import Path

from aiohttp import web

from mtls_proxy.cli import pki
from mtls_proxy.cli.loops import run_async
from mtls_proxy.core.config import load_config
from mtls_proxy.material.tls import load_material
from mtls_proxy.server.listener import ProxyServer
from mtls_proxy.telemetry.logs import setup_logging

ALLOWED_URI = "spiffe://demo.local/ns/demo/sa/allowed"


def make_demo_pki(d: Path) -> None:
    """root/intermediate CA, server, an allowed and a denied client, in *d*."""
    _, inter = pki.init_pki(d)
    pki.write_pair(
        d,
        "server",
        pki.issue(
            inter,
            "server",
            "localhost",
            dns=["localhost"],
            ips=["127.0.0.1"],
            uris=["spiffe://demo.local/proxy"],
        ),
    )
    pki.write_pair(
        d, "allowed", pki.issue(inter, "client", "demo-allowed", o="Demo", uris=[ALLOWED_URI])
    )
    pki.write_pair(
        d,
        "denied",
        pki.issue(
            inter, "client", "demo-denied", o="Demo", uris=["spiffe://demo.local/ns/demo/sa/denied"]
        ),
    )


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.path_qs,
            "headers": dict(request.headers),
            "body_bytes": len(body),
        }
    )


def _request(port: int, d: Path, client: str | None) -> tuple[str, str]:
    """One HTTPS GET with Python's ssl; returns (outcome, detail)."""
    ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
    if client:
        ctx.load_cert_chain(d / f"{client}.crt", d / f"{client}.key")
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            s.sendall(b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):  # TLS 1.3: a rejected certificate shows on first read
                data += chunk
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        return "handshake failed", type(exc).__name__ + ": " + str(exc)
    head, _, body = data.partition(b"\r\n\r\n")
    if not head:
        return "no response", "connection closed by the proxy during the handshake"
    status = head.split(b" ", 2)[1].decode()
    return status, body.decode(errors="replace")


def _self_test(port: int, d: Path) -> bool:
    ok = True
    status, body = _request(port, d, "allowed")
    seen = json.loads(body).get("headers", {}) if status == "200" else {}
    xfcc = next((v for k, v in seen.items() if k.lower() == "x-forwarded-client-cert"), None)
    good = status == "200" and bool(xfcc) and ALLOWED_URI in str(xfcc)
    ok &= good
    print(
        f"[{'PASS' if good else 'FAIL'}] allowed client      -> {status}; upstream saw "
        f"x-forwarded-client-cert: {xfcc}"
    )
    status, body = _request(port, d, "denied")
    good = status == "403"
    ok &= good
    print(f"[{'PASS' if good else 'FAIL'}] denied client       -> {status} {body.strip()}")
    status, detail = _request(port, d, None)
    # TLS 1.3 verifies the client after its Finished: the failure shows as an error or EOF
    # on the first read, never as an HTTP response.
    good = status in ("handshake failed", "no response")
    ok &= good
    print(f"[{'PASS' if good else 'FAIL'}] no client cert      -> {status} ({detail})")
    return ok


async def _run(d: Path, self_test: bool, port: int) -> int:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    up_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    cfg = load_config(
        flags={
            "listen": f"127.0.0.1:{port}",
            "admin": "127.0.0.1:0",
            "upstream": f"http://127.0.0.1:{up_port}",
            "cert": str(d / "server.crt"),
            "key": str(d / "server.key"),
            "cacert": str(d / "ca.crt"),
            "allow-uri": [ALLOWED_URI],
            "access-log": not self_test,
        }
    )
    server = ProxyServer(cfg, load_material(cfg.tls))
    try:
        if self_test:
            await server.start()
            port = server.address[1]
            ok = await asyncio.to_thread(_self_test, port, d)
            print("demo self-test:", "OK" if ok else "FAILED")
            await server.shutdown()
            return 0 if ok else 1
        serving = asyncio.get_running_loop().create_task(server.run())
        started = asyncio.get_running_loop().create_task(server.started.wait())
        # run() fails in start() when the port is taken, and then never sets `started`:
        # waiting for `started` alone hung silently (deaf to Ctrl-C, whose handler run() owns).
        await asyncio.wait({serving, started}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if not server.started.is_set():
            try:
                serving.result()  # start() failed: this raises its error
            except OSError as exc:
                cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
                raise OSError(
                    f"demo --port {port}: 127.0.0.1:{port}: {cause.strerror or cause}; "
                    "choose another with --port N, or --port 0 for a free one"
                ) from exc
        port = server.address[1]
        base = f"curl --cacert {d}/ca.crt https://localhost:{port}/hello"
        print(
            f"""
mtls-proxy demo: proxy on https://localhost:{port} -> echo upstream on 127.0.0.1:{up_port}
admin: http://{server.admin_address}/status   certificates in {d}

  # allowed client (200; the echo shows the injected identity headers)
  {base} --cert {d}/allowed.crt --key {d}/allowed.key
  # denied client (403)
  {base} --cert {d}/denied.crt --key {d}/denied.key
  # no client certificate (the TLS handshake fails)
  {base}

Ctrl-C to stop.""",
            flush=True,
        )
        await serving
        return 0
    finally:
        await runner.cleanup()


def run_demo(self_test: bool = False, port: int | None = None) -> int:
    """Entry point of ``mtls-proxy demo``: the proxy on 127.0.0.1:*port* (default 8443; a free
    port for the self-test, or with 0)."""
    if port is None:
        port = 0 if self_test else 8443
    setup_logging("text", "warning" if self_test else "info")
    d = Path(tempfile.mkdtemp(prefix="mtls-proxy-demo-"))
    served = False
    try:
        make_demo_pki(d)
        code = run_async(lambda: _run(d, self_test, port))
        served = True
        return code
    finally:
        # Kept only after a demo that ran: its curl commands name these files.
        if self_test or not served:
            shutil.rmtree(d, ignore_errors=True)
        else:
            print(f"certificates left in {d}", file=sys.stderr)
